/*
 * credits.js: keeps a page's credits badge current and shows the upgrade
 * notice when an AI call is refused for lack of credits. No dependencies, no
 * build step: include it with <script src="/credits.js"></script>.
 *
 * It reads the headers that the credits gateway puts on metered calls:
 *   Credits-Remaining: the org's balance after the call
 *   Credits-Notice:    "low" (the balance is running low) or "exhausted"
 *                      (a 402 whose problem body the notice shows)
 *   Credits-Hold:      a streamed call, charged when its body ends: once the
 *                      page has read the body to its end, the badge is set
 *                      again from the last Credits.refresh endpoint (a
 *                      browser cannot read the final charge in the trailers)
 *
 * The page marks the elements:
 *   <span data-credits-badge></span>   the balance, e.g. "4 credits"; gets
 *                                      data-credits-state="ok|low|exhausted"
 *                                      and data-credits-balance="4"
 *
 * The state is "exhausted" for a 402 (a notice route's or a block route's)
 * and for a balance of 0 or below (an overdraft route's debt), after a call
 * and after a refresh alike; "low" when the gateway said so, and after a
 * refresh while the balance has not risen above the one it said so at (the
 * balance endpoint knows no route's low_balance); "ok" otherwise.
 *   <div data-credits-notice hidden></div>   the upgrade notice (role="alert")
 *
 * API (window.Credits):
 *   Credits.fetch(url, init)   fetch, then read the credit headers
 *   Credits.watchFetch()       read them on every window.fetch; returns unwatch
 *   Credits.observe(response)  read them on a response the page fetched itself
 *   Credits.refresh(url, init) set the badge from a credits_balance endpoint
 *   Credits.format             (balance, state) => the badge's text
 * and a "credits:change" event on document with {balance, state, problem}.
 *
 * A cross-origin page can read the headers because the gateway answers a
 * request that has an Origin with Access-Control-Expose-Headers.
 */
(function (global) {
	'use strict';

	var doc = global.document;
	var BADGE = '[data-credits-badge]';
	var NOTICE = '[data-credits-notice]';

	// unwatched is window.fetch as it was before watchFetch patched it.
	var unwatched = null;
	// balanceSource is the last endpoint Credits.refresh read, to read again
	// when a streamed call ends.
	var balanceSource = null;
	// lowAt is the balance of the last answer that said "low", while no
	// later answer said otherwise.
	var lowAt = null;

	function baseFetch() {
		return unwatched || global.fetch;
	}

	function parseBalance(value) {
		if (value === null || !/^\s*-?\d+\s*$/.test(value)) {
			return null;
		}
		return Number(value);
	}

	function format(balance, state) {
		var text = balance.toLocaleString('en-US') + (balance === 1 || balance === -1 ? ' credit' : ' credits');
		return state === 'low' ? text + ' (low)' : text;
	}

	// safeURL answers url if it is an http(s) URL, so a notice never links
	// to javascript: or data:.
	function safeURL(url) {
		if (typeof url !== 'string' || url === '') {
			return '';
		}
		try {
			var u = new URL(url, global.location.href);
			return u.protocol === 'https:' || u.protocol === 'http:' ? u.href : '';
		} catch (e) {
			return '';
		}
	}

	// stateOf is the badge's state for a balance: of a call's answer (its
	// status and Credits-Notice), or of a refresh (status undefined).
	function stateOf(balance, notice, status) {
		if (status === 402 || balance <= 0) {
			return 'exhausted';
		}
		if (notice === 'low') {
			lowAt = balance;
			return 'low';
		}
		if (status !== undefined) {
			lowAt = null;
			return 'ok';
		}
		return lowAt !== null && balance <= lowAt ? 'low' : 'ok';
	}

	function setBalance(balance, state, problem) {
		var badges = doc.querySelectorAll(BADGE);
		for (var i = 0; i < badges.length; i++) {
			var badge = badges[i];
			badge.textContent = Credits.format(balance, state);
			badge.setAttribute('data-credits-balance', String(balance));
			badge.setAttribute('data-credits-state', state);
		}
		doc.dispatchEvent(new CustomEvent('credits:change', {
			detail: { balance: balance, state: state, problem: problem || null },
		}));
	}

	function showNotice(problem) {
		var notices = doc.querySelectorAll(NOTICE);
		for (var i = 0; i < notices.length; i++) {
			var notice = notices[i];
			var text = doc.createElement('p');
			text.textContent = problem.detail || 'Your organization has run out of credits.';
			var parts = [text];
			var href = safeURL(problem.topup_url);
			if (href) {
				var link = doc.createElement('a');
				link.href = href;
				link.textContent = 'Add credits';
				link.setAttribute('data-credits-topup', '');
				parts.push(link);
			}
			notice.setAttribute('role', 'alert');
			notice.replaceChildren.apply(notice, parts);
			notice.hidden = false;
		}
	}

	function hideNotice() {
		var notices = doc.querySelectorAll(NOTICE);
		for (var i = 0; i < notices.length; i++) {
			notices[i].hidden = true;
			notices[i].replaceChildren();
		}
	}

	// observe reads the credit headers of a response and updates the page.
	// It resolves to the response, unread: a 402's body is read from a clone.
	// A response without the headers (not a metered call) changes nothing.
	function observe(response) {
		var balance = parseBalance(response.headers.get('Credits-Remaining'));
		var notice = (response.headers.get('Credits-Notice') || '').trim().toLowerCase();
		if (balance === null && notice === '') {
			return Promise.resolve(response);
		}
		if (response.status === 402 && notice === 'exhausted') {
			return response.clone().json().catch(function () {
				return {};
			}).then(function (problem) {
				if (balance === null && typeof problem.balance === 'number') {
					balance = problem.balance;
				}
				if (balance !== null) {
					setBalance(balance, stateOf(balance, notice, 402), problem);
				}
				showNotice(problem);
				return response;
			});
		}
		if (balance !== null) {
			setBalance(balance, stateOf(balance, notice, response.status));
		}
		if (response.ok) {
			hideNotice();
		}
		if (response.headers.get('Credits-Hold') !== null && response.body && balanceSource &&
			typeof TransformStream === 'function') {
			return Promise.resolve(afterBody(response));
		}
		return Promise.resolve(response);
	}

	// afterBody returns the response with a body that, once read to its end,
	// sets the badge again from credits_balance: a streamed call's charge is
	// settled when its body ends.
	function afterBody(response) {
		var source = balanceSource;
		var body = response.body.pipeThrough(new TransformStream({
			flush: function () {
				refresh(source.url, source.init);
			},
		}));
		return new Response(body, { status: response.status, statusText: response.statusText, headers: response.headers });
	}

	function safeObserve(response) {
		try {
			return observe(response).catch(function () {
				return response;
			});
		} catch (e) {
			return response;
		}
	}

	function creditsFetch(input, init) {
		return baseFetch().call(global, input, init).then(safeObserve);
	}

	function unwatch() {
		if (unwatched) {
			global.fetch = unwatched;
			unwatched = null;
		}
	}

	function watchFetch() {
		if (!unwatched) {
			unwatched = global.fetch;
			global.fetch = function fetch(input, init) {
				return unwatched.call(global, input, init).then(safeObserve);
			};
		}
		return unwatch;
	}

	// refresh sets the badge from a credits_balance endpoint, which answers
	// {"org": ..., "balance": n, ...}. It resolves to that body, or null.
	function refresh(url, init) {
		balanceSource = { url: url, init: init };
		return baseFetch().call(global, url, init).then(function (response) {
			if (!response.ok) {
				return null;
			}
			return response.json().then(function (body) {
				if (typeof body.balance === 'number') {
					setBalance(body.balance, stateOf(body.balance));
				}
				return body;
			});
		}).catch(function () {
			return null;
		});
	}

	var Credits = {
		fetch: creditsFetch,
		watchFetch: watchFetch,
		observe: observe,
		refresh: refresh,
		format: format,
	};
	global.Credits = Credits;
})(window);
