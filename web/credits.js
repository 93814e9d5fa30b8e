/*
 * credits.js: keeps a page's credits badge current and shows the upgrade
 * notice when an AI call is refused for lack of credits. An ES module with
 * no dependencies and no build step:
 *
 *   import { Credits } from '/credits.js';      // served as a static file
 *   import { Credits } from '@creditsgw/credits'; // installed with npm
 *
 * Types are in credits.d.ts.
 *
 * It reads the headers that the credits gateway puts on metered calls:
 *   Credits-Remaining: the org's balance after the call
 *   Credits-Notice:    "low" (the balance is running low), "exhausted"
 *                      (a 402 whose problem body the notice shows) or
 *                      "budget" (a 402: the caller's budget is spent)
 *   Credits-Budget-Remaining: what the caller's budget in the org has left,
 *                      on a route with a budget
 *   Credits-Hold:      a streamed call, charged when its body ends: once the
 *                      page has read the body to its end, the badge is set
 *                      again from the last refresh endpoint (a browser
 *                      cannot read the final charge in the trailers)
 *
 * The page marks the elements:
 *   <span data-credits-badge></span>   the balance, e.g. "4 credits"; gets
 *                                      data-credits-state="ok|low|exhausted"
 *                                      and data-credits-balance="4"; with
 *                                      a budget, "4 credits · 2 of 5 left
 *                                      today" and data-credits-budget-
 *                                      remaining, data-credits-budget-state
 *                                      ="ok|spent"
 *   <div data-credits-notice hidden></div>   the upgrade notice (role="alert")
 *
 * The state is "exhausted" for a 402 (a notice route's or a block route's)
 * and for a balance of 0 or below (an overdraft route's debt), after a call
 * and after a refresh alike; "low" when the gateway said so, and after a
 * refresh while the balance has not risen above the one it said so at (the
 * balance endpoint knows no route's low_balance); "ok" otherwise. A 402 of
 * a spent budget (type .../budget-spent) leaves the org's state to its
 * balance: the org has credits, the caller's budget has none.
 *
 * The budget, {subject, limit, window, spent, remaining, resets} as
 * credits_balance answers it with a budget, is kept from the last refresh;
 * a call's Credits-Budget-Remaining and a budget 402's problem update it.
 *
 * API (named exports, and the same on the Credits object):
 *   fetch(url, init)    fetch, then read the credit headers
 *   watchFetch()        read them on every window.fetch; returns unwatch
 *   observe(response)   read them on a response the page fetched itself
 *   refresh(url, init)  set the badge from a credits_balance endpoint
 *   current()           {balance, state, budget} as the badge shows them,
 *                       or null before the first
 *   Credits.format      (balance, state) => the badge's text; replaceable
 *   Credits.formatBudget  (budget) => the budget's text; replaceable
 * Events on document:
 *   "credits:change"    {balance, state, problem, budget}: the badge changed
 *   "credits:error"     {error, url, status, problem}: a refresh or a
 *                       Credits.fetch failed (the promise rejects too)
 *
 * Nothing fails silently: refresh rejects with a CreditsError when the
 * endpoint answers anything but 2xx JSON with a balance, and with the
 * browser's TypeError when the call fails ("Failed to fetch": the gateway
 * is down, or a CORS preflight was refused); either also fires
 * credits:error.
 *
 * A cross-origin page can read the headers because the gateway answers a
 * request that has an Origin with Access-Control-Expose-Headers.
 */

const BADGE = '[data-credits-badge]';
const NOTICE = '[data-credits-notice]';
const BUDGET_SPENT = 'https://creditsgw.dev/problems/budget-spent';
// The words of a budget's window, after "left".
const WINDOW_WORDS = { day: 'today', week: 'this week', month: 'this month', period: 'this period' };

// unwatched is window.fetch as it was before watchFetch patched it.
let unwatched = null;
// balanceSource is the last endpoint refresh read, to read again when a
// streamed call ends.
let balanceSource = null;
// lowAt is the balance of the last answer that said "low", while no later
// answer said otherwise.
let lowAt = null;
// shown is what the badge shows: {balance, state}, or null before the
// first answer.
let shown = null;
// budget is the caller's budget as last known, or null when none applies.
let budget = null;
// budgetRefused says whether the last answer was a budget's 402.
let budgetRefused = false;

/**
 * CreditsError is how a refresh fails when the endpoint answered: status is
 * the HTTP status (0 when the answer was not the JSON expected), problem
 * the RFC 9457 problem body, if any.
 */
export class CreditsError extends Error {
	constructor(message, status, problem) {
		super(message);
		this.name = 'CreditsError';
		this.status = status;
		this.problem = problem || null;
	}
}

function baseFetch() {
	return unwatched || globalThis.fetch;
}

function parseBalance(value) {
	if (value === null || !/^\s*-?\d+\s*$/.test(value)) {
		return null;
	}
	return Number(value);
}

function defaultFormat(balance, state) {
	const text = balance.toLocaleString('en-US') + (balance === 1 || balance === -1 ? ' credit' : ' credits');
	return state === 'low' ? text + ' (low)' : text;
}

// defaultFormatBudget words a budget: "12 of 50 left today", or "12 left in
// your budget" when only a call's header told it.
function defaultFormatBudget(b) {
	const left = b.remaining.toLocaleString('en-US');
	if (typeof b.limit !== 'number') {
		return left + ' left in your budget';
	}
	const when = WINDOW_WORDS[b.window];
	return left + ' of ' + b.limit.toLocaleString('en-US') + ' left' + (when ? ' ' + when : '');
}

// budgetOf is the budget object of a balance endpoint's answer, checked,
// or null.
function budgetOf(body) {
	const b = body && body.budget;
	if (b === null || typeof b !== 'object' || typeof b.remaining !== 'number') {
		return null;
	}
	return { ...b };
}

// budgetFromCall is the budget after a call that answered
// Credits-Budget-Remaining (remaining, or null) and, for a budget's 402,
// its problem: what the call told, over what was known.
function budgetFromCall(remaining, problem) {
	let b = budget ? { ...budget } : null;
	if (problem && problem.type === BUDGET_SPENT) {
		// Another subject's budget is another budget: its window is unknown.
		if (!b || b.subject !== problem.subject) {
			b = { subject: problem.subject };
		}
		for (const k of ['limit', 'spent', 'resets']) {
			if (problem[k] !== undefined) {
				b[k] = problem[k];
			}
		}
		b.remaining = remaining ?? Math.max(0, (b.limit ?? 0) - (b.spent ?? 0));
		return b;
	}
	if (remaining === null) {
		return b;
	}
	b = b || {};
	b.remaining = remaining;
	if (typeof b.limit === 'number') {
		// Spent may pass the limit (overdraft routes, a lowered limit):
		// with nothing left, it is at least the limit.
		b.spent = remaining > 0 ? b.limit - remaining : Math.max(b.limit, b.spent || 0);
	}
	return b;
}

// safeURL answers url if it is an http(s) URL, so a notice never links to
// javascript: or data:.
function safeURL(url) {
	if (typeof url !== 'string' || url === '') {
		return '';
	}
	try {
		const u = new URL(url, globalThis.location.href);
		return u.protocol === 'https:' || u.protocol === 'http:' ? u.href : '';
	} catch {
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
	shown = { balance, state };
	for (const badge of document.querySelectorAll(BADGE)) {
		let text = Credits.format(balance, state);
		if (budget) {
			text += ' \u00b7 ' + Credits.formatBudget({ ...budget });
			badge.setAttribute('data-credits-budget-remaining', String(budget.remaining));
			badge.setAttribute('data-credits-budget-state', budgetRefused || budget.remaining <= 0 ? 'spent' : 'ok');
		} else {
			badge.removeAttribute('data-credits-budget-remaining');
			badge.removeAttribute('data-credits-budget-state');
		}
		badge.textContent = text;
		badge.setAttribute('data-credits-balance', String(balance));
		badge.setAttribute('data-credits-state', state);
	}
	document.dispatchEvent(new CustomEvent('credits:change', {
		detail: { balance, state, problem: problem || null, budget: budget ? { ...budget } : null },
	}));
}

// reportError fires credits:error and answers err, for the caller to throw.
function reportError(err, url) {
	document.dispatchEvent(new CustomEvent('credits:error', {
		detail: { error: err, url: String(url), status: err.status || 0, problem: err.problem || null },
	}));
	return err;
}

// showNotice shows a 402's problem in the notice: kind "exhausted", the
// org's credits, with a link to add credits; or "budget", the caller's own
// budget, which no top-up changes.
function showNotice(problem, kind) {
	for (const notice of document.querySelectorAll(NOTICE)) {
		const text = document.createElement('p');
		text.textContent = problem.detail || (kind === 'budget'
			? 'Your budget is spent for now.'
			: 'Your organization has run out of credits.');
		const parts = [text];
		const href = kind === 'budget' ? '' : safeURL(problem.topup_url);
		if (href) {
			const link = document.createElement('a');
			link.href = href;
			link.textContent = 'Add credits';
			link.setAttribute('data-credits-topup', '');
			parts.push(link);
		}
		notice.setAttribute('role', 'alert');
		notice.setAttribute('data-credits-notice-kind', kind);
		notice.replaceChildren(...parts);
		notice.hidden = false;
	}
}

function hideNotice() {
	for (const notice of document.querySelectorAll(NOTICE)) {
		notice.hidden = true;
		notice.removeAttribute('data-credits-notice-kind');
		notice.replaceChildren();
	}
}

/**
 * observe reads the credit headers of a response and updates the page. It
 * resolves to the response, unread: a 402's body is read from a clone. A
 * response without the headers (not a metered call) changes nothing.
 */
export async function observe(response) {
	let balance = parseBalance(response.headers.get('Credits-Remaining'));
	const notice = (response.headers.get('Credits-Notice') || '').trim().toLowerCase();
	const remaining = parseBalance(response.headers.get('Credits-Budget-Remaining'));
	if (balance === null && notice === '' && remaining === null) {
		return response;
	}
	if (response.status === 402) {
		// Every 402 tells the page why, in credits:change's problem; only a
		// notice route's shows the notice.
		let problem = await response.clone().json().catch(() => ({}));
		if (problem === null || typeof problem !== 'object') {
			problem = {};
		}
		if (balance === null && typeof problem.balance === 'number') {
			balance = problem.balance;
		}
		const spent = problem.type === BUDGET_SPENT || notice === 'budget';
		budget = budgetFromCall(remaining, spent ? problem : null);
		budgetRefused = spent;
		if (balance === null && shown) {
			balance = shown.balance;
		}
		if (balance !== null) {
			// A spent budget is not the org's: its state is its balance's.
			setBalance(balance, spent ? stateOf(balance) : stateOf(balance, notice, 402), problem);
		}
		if (notice === 'exhausted' || notice === 'budget') {
			showNotice(problem, notice);
		}
		return response;
	}
	if (remaining !== null) {
		budget = budgetFromCall(remaining, null);
		budgetRefused = false;
		if (balance === null && shown) {
			balance = shown.balance;
		}
	}
	if (balance !== null) {
		setBalance(balance, stateOf(balance, notice, response.status));
	}
	if (response.ok) {
		hideNotice();
	}
	if (response.headers.get('Credits-Hold') !== null && response.body && balanceSource &&
		typeof TransformStream === 'function') {
		return afterBody(response);
	}
	return response;
}

// afterBody returns the response with a body that, once read to its end,
// sets the badge again from credits_balance: a streamed call's charge is
// settled when its body ends.
function afterBody(response) {
	const source = balanceSource;
	const body = response.body.pipeThrough(new TransformStream({
		flush() {
			// A failure is reported by credits:error; the page's read of
			// the body has succeeded and must not fail for it.
			refresh(source.url, source.init).catch(() => {});
		},
	}));
	return new Response(body, { status: response.status, statusText: response.statusText, headers: response.headers });
}

// safeObserve observes a response for fetch and watchFetch: the page gets
// its response even if reading the headers fails.
function safeObserve(response) {
	return observe(response).catch(() => response);
}

/**
 * fetch is window.fetch, then reads the response's credit headers. It
 * resolves to the response, its body unread; a call that fails rejects as
 * fetch does, and fires credits:error.
 */
function creditsFetch(input, init) {
	return baseFetch().call(globalThis, input, init).then(safeObserve, (err) => {
		throw reportError(err, input instanceof Request ? input.url : input);
	});
}
export { creditsFetch as fetch };

function unwatch() {
	if (unwatched) {
		globalThis.fetch = unwatched;
		unwatched = null;
	}
}

/**
 * watchFetch patches window.fetch so that every response is read; it
 * returns a function that undoes it.
 */
export function watchFetch() {
	if (!unwatched) {
		unwatched = globalThis.fetch;
		globalThis.fetch = function fetch(input, init) {
			return unwatched.call(globalThis, input, init).then(safeObserve);
		};
	}
	return unwatch;
}

/**
 * refresh sets the badge from a credits_balance endpoint, which answers
 * {"org": ..., "balance": n, ...}. It resolves to that body. It rejects, and
 * fires credits:error, when the call fails (a TypeError: the network, or a
 * CORS refusal) or the endpoint answers anything else (a CreditsError with
 * the status and the problem, e.g. 401 when the caller is not signed in).
 */
export async function refresh(url, init) {
	balanceSource = { url, init };
	try {
		const response = await baseFetch().call(globalThis, url, init);
		const body = await response.json().catch(() => null);
		if (!response.ok) {
			const detail = body && typeof body.detail === 'string' ? body.detail : response.statusText;
			throw new CreditsError('the balance endpoint answered ' + response.status + (detail ? ': ' + detail : ''),
				response.status, body);
		}
		if (body === null || typeof body.balance !== 'number') {
			throw new CreditsError('the balance endpoint answered no balance', 0, null);
		}
		// The endpoint's budget replaces what calls told; without one, no
		// budget applies to the caller there.
		budget = budgetOf(body);
		budgetRefused = false;
		setBalance(body.balance, stateOf(body.balance));
		return body;
	} catch (err) {
		throw reportError(err, url);
	}
}

/**
 * current answers what the badge shows: {balance, state, budget}, budget
 * null when none applies; or null before the first balance.
 */
export function current() {
	if (!shown) {
		return null;
	}
	return { balance: shown.balance, state: shown.state, budget: budget ? { ...budget } : null };
}

/**
 * Credits holds the API in one object, as the script of earlier versions
 * put it on window; format, the badge's wording, may be replaced.
 */
export const Credits = {
	fetch: creditsFetch,
	watchFetch,
	observe,
	refresh,
	current,
	format: defaultFormat,
	formatBudget: defaultFormatBudget,
	CreditsError,
};

export default Credits;
