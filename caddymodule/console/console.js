// The usage console: reads and changes an org's credits through the admin
// API. Every URL is relative to the page, which credits_admin serves at its
// mount root, so the console works under any prefix. Errors shown are the
// API's own (the problem's detail): the console checks nothing itself.
// Every write is safe to send again: a top-up carries a reference (one the
// console makes when the field is empty, kept in the field until the top-up
// succeeds), and a capture or a release names its hold.
'use strict';

(() => {
	const TOKEN_KEY = 'credits-console-token';
	const EVENTS_SHOWN = 20;

	const $ = (id) => document.getElementById(id);
	const el = {
		lookup: $('lookup'), token: $('token'), org: $('org'), show: $('show'),
		error: $('error'), status: $('status'),
		account: $('account'), accountOrg: $('account-org'),
		balance: $('balance'), held: $('held'), available: $('available'),
		allowanceRemaining: $('allowance-remaining'),
		purchased: $('purchased'), nextRecharge: $('next-recharge'),
		plan: $('plan'), period: $('period'), usage: $('usage'), usageEmpty: $('usage-empty'),
		topup: $('topup'), amount: $('amount'), reference: $('reference'),
		planForm: $('plan-form'), allowance: $('allowance'), month: $('month'),
		events: document.querySelector('#events tbody'),
		holds: document.querySelector('#holds tbody'), holdsTable: $('holds'), holdsEmpty: $('holds-empty'),
	};

	const number = new Intl.NumberFormat('en-US');
	const longDate = new Intl.DateTimeFormat('en-GB', { dateStyle: 'long', timeZone: 'UTC' });
	const months = ['January', 'February', 'March', 'April', 'May', 'June', 'July',
		'August', 'September', 'October', 'November', 'December'];

	// The account on screen, if any.
	let shown = null;

	class APIError extends Error {
		constructor(status, detail) {
			super(detail);
			this.status = status;
		}
	}

	// call makes one admin API call and answers its JSON, or throws an
	// APIError with the problem's detail.
	async function call(method, path, body) {
		const headers = { Accept: 'application/json' };
		if (el.token.value) {
			headers.Authorization = 'Bearer ' + el.token.value;
		}
		const init = { method, headers, cache: 'no-store' };
		if (body !== undefined) {
			headers['Content-Type'] = 'application/json';
			init.body = body;
		}
		let resp;
		try {
			resp = await fetch(path, init);
		} catch (err) {
			throw new APIError(0, 'The admin API could not be reached (' + err.message + ').');
		}
		const type = resp.headers.get('Content-Type') || '';
		let data = null;
		if (type.includes('json')) {
			data = await resp.json().catch(() => null);
		}
		if (!resp.ok) {
			const detail = data && typeof data.detail === 'string' && data.detail
				? data.detail : resp.status + ' ' + resp.statusText;
			throw new APIError(resp.status, detail);
		}
		if (data === null) {
			throw new APIError(resp.status, 'The admin API answered something other than JSON.');
		}
		return data;
	}

	function orgPath(org, action) {
		return 'orgs/' + encodeURIComponent(org) + (action ? '/' + action : '');
	}

	// newReference is a random top-up reference: sent again, it applies once.
	function newReference() {
		const bytes = crypto.getRandomValues(new Uint8Array(16));
		return 'console-' + Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');
	}

	// outcomeUnknown says whether a failed write may have been applied.
	function outcomeUnknown(err) {
		return err.status === 0 || err.status === 502 || err.status === 503 || err.status === 504;
	}

	// jsonNumber passes what the admin typed to the API as it is: a number
	// literal as a JSON number (exact, whatever its size), anything else as a
	// string, so that the API's validation, and its error, decides.
	function jsonNumber(text) {
		const s = text.trim();
		return /^-?\d+(\.\d+)?([eE][+-]?\d+)?$/.test(s) ? s : JSON.stringify(s);
	}

	function jsonObject(fields) {
		const parts = [];
		for (const [name, raw] of fields) {
			if (raw !== undefined) {
				parts.push(JSON.stringify(name) + ':' + raw);
			}
		}
		return '{' + parts.join(',') + '}';
	}

	function say(message) {
		el.error.textContent = '';
		el.status.textContent = message;
	}

	function fail(what, err) {
		el.status.textContent = '';
		el.error.textContent = what + ': ' + err.message;
		if (err.status === 401) {
			el.token.focus();
		}
	}

	function credits(n) {
		return number.format(n) + (n === 1 || n === -1 ? ' credit' : ' credits');
	}

	function timeElement(iso, text) {
		const t = document.createElement('time');
		t.dateTime = iso;
		t.textContent = text;
		return t;
	}

	function planText(plan) {
		return credits(plan.allowance) + ' a year, recharging on 1 ' + (months[plan.recharge_month - 1] || '?');
	}

	function renderAccount(acct) {
		shown = acct;
		el.accountOrg.textContent = acct.org;
		el.balance.textContent = number.format(acct.balance);
		el.held.textContent = number.format(acct.held || 0);
		el.available.textContent = number.format(acct.available ?? acct.balance);
		el.allowanceRemaining.textContent = number.format(acct.allowance_remaining);
		el.purchased.textContent = number.format(acct.purchased);
		el.nextRecharge.replaceChildren(timeElement(acct.next_recharge, longDate.format(new Date(acct.next_recharge))));

		let plan = 'Plan: ' + planText(acct.plan) + (acct.own_plan ? '.' : ' (the default plan).');
		if (acct.next_plan) {
			plan += ' From the next recharge: ' + planText(acct.next_plan) + '.';
		}
		el.plan.textContent = plan;
		el.period.replaceChildren('(since ', timeElement(acct.period_start, longDate.format(new Date(acct.period_start))), ')');
		renderUsage(acct.used || {});
		el.account.hidden = false;
	}

	// renderUsage draws the credits used per feature as horizontal bars,
	// the largest full width. The bars are decoration; the numbers are text.
	function renderUsage(used) {
		const rows = Object.entries(used)
			.map(([feature, n]) => [feature, Math.max(0, Number(n) || 0)])
			.sort((a, b) => b[1] - a[1] || a[0].localeCompare(b[0]));
		const max = Math.max(1, ...rows.map((r) => r[1]));
		el.usage.replaceChildren(...rows.map(([feature, n]) => {
			const li = document.createElement('li');
			li.dataset.feature = feature;
			li.dataset.used = String(n);
			const name = document.createElement('span');
			name.className = 'bar-name';
			name.textContent = feature;
			const track = document.createElement('span');
			track.className = 'bar-track';
			track.setAttribute('aria-hidden', 'true');
			const fill = document.createElement('span');
			fill.className = 'bar-fill';
			// CSSOM, not a style attribute: the page's CSP allows no inline style.
			fill.style.width = (100 * n / max).toFixed(1) + '%';
			track.append(fill);
			const value = document.createElement('span');
			value.className = 'bar-value';
			value.textContent = credits(n);
			li.append(name, track, value);
			return li;
		}));
		el.usage.hidden = rows.length === 0;
		el.usageEmpty.hidden = rows.length !== 0;
	}

	function renderEvents(events) {
		el.events.replaceChildren(...events.map((ev) => {
			const tr = document.createElement('tr');
			const cell = (text, cls) => {
				const td = document.createElement('td');
				if (cls) {
					td.className = cls;
				}
				td.textContent = text;
				tr.append(td);
				return td;
			};
			const when = cell('');
			when.append(timeElement(ev.time, ev.time.replace('T', ' ').replace(/(\.\d+)?Z$/, '')));
			cell(ev.kind);
			cell(ev.feature || '');
			cell((ev.delta > 0 ? '+' : '') + number.format(ev.delta), 'num');
			cell(number.format(ev.balance), 'num');
			cell(ev.ref || '', 'ref').title = ev.ref || '';
			return tr;
		}));
	}

	// renderHolds lists the holds, each live one with Capture and Release;
	// a gateway's lease is the gateway's to end, so it has neither.
	function renderHolds(holds) {
		el.holds.replaceChildren(...holds.map((h) => {
			const tr = document.createElement('tr');
			tr.dataset.hold = h.hold;
			const cell = (text, cls) => {
				const td = document.createElement('td');
				if (cls) {
					td.className = cls;
				}
				td.textContent = text;
				tr.append(td);
				return td;
			};
			const lease = h.hold.startsWith('lease:');
			cell(lease ? h.hold + ' (gateway lease)' : h.hold, 'ref').title = h.hold;
			cell(h.state);
			cell(h.feature || '');
			cell(number.format(h.state === 'captured' ? h.captured || 0 : h.amount), 'num');
			cell('').append(timeElement(h.expires, h.expires.replace('T', ' ').replace(/(\.\d+)?Z$/, '')));
			const actions = cell('', 'hold-actions');
			if (h.state === 'held' && !lease) {
				const amount = document.createElement('input');
				amount.type = 'text';
				amount.inputMode = 'numeric';
				amount.autocomplete = 'off';
				amount.value = String(h.amount);
				amount.className = 'capture-amount';
				amount.setAttribute('aria-label', 'Credits to capture of hold ' + h.hold);
				const capture = document.createElement('button');
				capture.type = 'button';
				capture.className = 'capture';
				capture.textContent = 'Capture';
				capture.setAttribute('aria-label', 'Capture hold ' + h.hold);
				capture.addEventListener('click', () => busyButton(capture, () => endHold(h.hold, amount.value)));
				const release = document.createElement('button');
				release.type = 'button';
				release.className = 'release secondary';
				release.textContent = 'Release';
				release.setAttribute('aria-label', 'Release hold ' + h.hold);
				release.addEventListener('click', () => busyButton(release, () => endHold(h.hold)));
				actions.append(amount, capture, release);
			}
			return tr;
		}));
		el.holdsTable.hidden = holds.length === 0;
		el.holdsEmpty.hidden = holds.length !== 0;
	}

	function fillPlanForm(acct) {
		const plan = acct.next_plan || acct.plan;
		el.allowance.value = String(plan.allowance);
		el.month.value = String(plan.recharge_month);
	}

	async function refreshEvents(org) {
		const data = await call('GET', orgPath(org, 'events') + '?limit=' + EVENTS_SHOWN);
		renderEvents(data.events || []);
	}

	async function refreshHolds(org) {
		const data = await call('GET', orgPath(org, 'holds'));
		renderHolds(data.holds || []);
	}

	// endHold captures amount credits of a hold or, without an amount,
	// releases it. Either applies once, however often it is sent.
	async function endHold(id, amount) {
		const org = shown.org;
		const path = orgPath(org, 'holds/' + encodeURIComponent(id));
		const what = amount === undefined ? 'Release' : 'Capture';
		try {
			const acct = amount === undefined
				? await call('DELETE', path)
				: await call('POST', path + '/capture', jsonObject([['amount', amount.trim() === '' ? undefined : jsonNumber(amount)]]));
			renderAccount(acct);
			await Promise.all([refreshHolds(org), refreshEvents(org)]).catch(() => {});
			const h = acct.hold || {};
			say(h.state === 'captured'
				? 'Hold ' + id + ' captured: ' + credits(h.captured || 0) + ' charged. Available: ' + credits(acct.available) + '.'
				: 'Hold ' + id + ' ' + (h.state || 'ended') + '. Available: ' + credits(acct.available) + '.');
		} catch (err) {
			fail(what + ' of hold ' + id + ' refused', err);
			if (outcomeUnknown(err)) {
				el.status.textContent = 'Press ' + what + ' again to retry: a hold ends once.';
			}
		}
	}

	// busyButton disables a button while its call runs.
	async function busyButton(button, f) {
		button.disabled = true;
		try {
			await f();
		} finally {
			button.disabled = false;
		}
	}

	// busy disables a form's button while its call runs, so one click makes
	// one call.
	async function busy(form, f) {
		const button = form.querySelector('button');
		button.disabled = true;
		form.setAttribute('aria-busy', 'true');
		try {
			await f();
		} finally {
			button.disabled = false;
			form.removeAttribute('aria-busy');
		}
	}

	async function show() {
		const org = el.org.value.trim();
		try {
			const [acct, events, holds] = await Promise.all([
				call('GET', orgPath(org)),
				call('GET', orgPath(org, 'events') + '?limit=' + EVENTS_SHOWN),
				call('GET', orgPath(org, 'holds')),
			]);
			renderAccount(acct);
			renderEvents(events.events || []);
			renderHolds(holds.holds || []);
			fillPlanForm(acct);
			say('Showing organization ' + acct.org + '.');
		} catch (err) {
			shown = null;
			el.account.hidden = true;
			fail('Could not show organization ' + JSON.stringify(org), err);
		}
	}

	async function topUp() {
		const org = shown.org;
		let reference = el.reference.value.trim();
		if (reference === '') {
			reference = newReference();
			el.reference.value = reference;
		}
		const body = jsonObject([
			['amount', el.amount.value.trim() === '' ? undefined : jsonNumber(el.amount.value)],
			['reference', JSON.stringify(reference)],
		]);
		const before = shown.purchased;
		try {
			const acct = await call('POST', orgPath(org, 'topup'), body);
			renderAccount(acct);
			await refreshEvents(org).catch(() => {});
			el.amount.value = '';
			el.reference.value = '';
			if (acct.purchased === before) {
				say('Reference ' + JSON.stringify(reference) + ' was already applied to ' + org + '; nothing changed.');
			} else {
				say('Added ' + credits(acct.purchased - before) + ' to ' + org + '. Balance: ' + credits(acct.balance) + '.');
			}
		} catch (err) {
			fail('Top-up refused', err);
			if (outcomeUnknown(err)) {
				el.status.textContent = 'The reference ' + reference + ' stays in the form: press Add credits again to retry; it applies once.';
			}
		}
	}

	async function setPlan() {
		const org = shown.org;
		const body = jsonObject([
			['allowance', el.allowance.value.trim() === '' ? undefined : jsonNumber(el.allowance.value)],
			['recharge_month', jsonNumber(el.month.value)],
		]);
		try {
			const acct = await call('PUT', orgPath(org, 'plan'), body);
			renderAccount(acct);
			fillPlanForm(acct);
			await refreshEvents(org).catch(() => {});
			say(acct.next_plan
				? 'The new plan of ' + org + ' applies from ' + longDate.format(new Date(acct.next_recharge)) + '.'
				: 'Plan of ' + org + ' set: ' + planText(acct.plan) + '.');
		} catch (err) {
			fail('Plan refused', err);
		}
	}

	el.token.value = sessionStorage.getItem(TOKEN_KEY) || '';
	el.token.addEventListener('input', () => {
		if (el.token.value) {
			sessionStorage.setItem(TOKEN_KEY, el.token.value);
		} else {
			sessionStorage.removeItem(TOKEN_KEY);
		}
	});
	el.lookup.addEventListener('submit', (ev) => {
		ev.preventDefault();
		busy(el.lookup, show);
	});
	el.topup.addEventListener('submit', (ev) => {
		ev.preventDefault();
		busy(el.topup, topUp);
	});
	el.planForm.addEventListener('submit', (ev) => {
		ev.preventDefault();
		busy(el.planForm, setPlan);
	});
})();
