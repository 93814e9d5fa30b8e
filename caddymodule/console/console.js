// The usage console: reads and changes an org's credits through the admin
// API. Every URL is relative to the page, which credits_admin serves at its
// mount root, so the console works under any prefix. Errors shown are the
// API's own (the problem's detail): the console checks nothing itself, but
// for an adjustment, which it checks as the API does before sending it, and
// a budget's subject, which names the path.
// Every write is safe to send again: a top-up carries a reference (one the
// console makes when the field is empty, kept in the field until the top-up
// succeeds), an adjustment or a plan a fresh reference, kept while the same
// one is retried, a grant a fresh reference, kept likewise, a capture, a
// release or a grant's void names its hold or grant, and a budget's PUT or
// DELETE sets a state.
'use strict';

(() => {
	const TOKEN_KEY = 'credits-console-token';
	const EVENTS_SHOWN = 20;
	const ORGS_PAGE = 50;
	const BUDGETS_PAGE = 50;
	// The most budgets the API lists in one page (meter.MaxBudgetsPage).
	const MAX_BUDGETS_PAGE = 1000;
	// The API's bounds of an adjustment (meter.Ledger.Adjust).
	const MAX_AMOUNT = 1000000000000n;
	const MAX_REASON = 500;
	const DAY_MS = 24 * 60 * 60 * 1000;
	// The chart's size in its own units; it scales to the page's width.
	const CHART = { width: 800, height: 240, left: 52, right: 8, top: 12, bottom: 30 };
	// How many colours the chart has (.s0 to .s7 in console.css).
	const SERIES = 8;
	const SVG = 'http://www.w3.org/2000/svg';

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
		orgSearchForm: $('org-search-form'), orgSearch: $('org-search'), orgsReload: $('orgs-reload'),
		orgsCount: $('orgs-count'), orgList: $('org-list'), orgsMore: $('orgs-more'),
		chartRange: $('chart-range'), chart: $('chart'), chartLegend: $('chart-legend'),
		chartSummary: $('chart-summary'),
		usageTableHead: document.querySelector('#usage-table thead tr'),
		usageTable: document.querySelector('#usage-table tbody'),
		adjust: $('adjust'), adjustAmount: $('adjust-amount'), adjustReason: $('adjust-reason'),
		promotional: $('promotional'),
		grants: document.querySelector('#grants tbody'),
		grantForm: $('grant-form'), grantAmount: $('grant-amount'), grantExpires: $('grant-expires'), grantReason: $('grant-reason'),
		voidForm: $('void-form'), voidGrant: $('void-grant'), voidReason: $('void-reason'), voidCancel: $('void-cancel'),
		debtFigure: $('debt-figure'), debt: $('debt'),
		leasesToggle: $('leases-toggle'), showLeases: $('show-leases'), leasesCount: $('leases-count'),
		budgets: document.querySelector('#budgets tbody'), budgetsTable: $('budgets'), budgetsEmpty: $('budgets-empty'),
		budgetsCount: $('budgets-count'), budgetsMore: $('budgets-more'),
		defaultBudgetText: $('default-budget-text'), defaultRemove: $('default-remove'),
		budgetForm: $('budget-form'), budgetForSubject: $('budget-for-subject'), budgetForDefault: $('budget-for-default'),
		budgetSubject: $('budget-subject'), budgetLimit: $('budget-limit'), budgetWindow: $('budget-window'),
	};

	// Where each action's outcome is said: next to the control that made it,
	// so a confirmation or a refusal is seen where the admin is looking. A
	// void's confirmation goes under the grants table, as its form closes.
	const place = (id) => ({ status: $(id + '-status'), error: $(id + '-error') });
	const page = { status: el.status, error: el.error };
	const places = {
		topup: place('topup'), adjust: place('adjust'), plan: place('plan'), grant: place('grant'),
		void: place('void'), grants: place('grants'), holds: place('holds'),
		budget: place('budget'), budgets: place('budgets'), defaultBudget: place('default-budget'),
	};

	const number = new Intl.NumberFormat('en-US');
	const longDate = new Intl.DateTimeFormat('en-GB', { dateStyle: 'long', timeZone: 'UTC' });
	const dayMonth = new Intl.DateTimeFormat('en-GB', { day: 'numeric', month: 'short', timeZone: 'UTC' });
	const monthOnly = new Intl.DateTimeFormat('en-GB', { month: 'short', timeZone: 'UTC' });
	const monthYear = new Intl.DateTimeFormat('en-GB', { month: 'short', year: 'numeric', timeZone: 'UTC' });
	const months = ['January', 'February', 'March', 'April', 'May', 'June', 'July',
		'August', 'September', 'October', 'November', 'December'];

	// The account on screen, if any.
	let shown = null;

	// The orgs listed so far, in the API's order, each with its list item,
	// and the org to list from next ('' when all are listed); loaded says
	// whether a first page came. orgsCall counts the list's calls, so that
	// only the latest one's answer is shown.
	const listed = new Map();
	let orgsNext = '';
	let orgsLoaded = false;
	let orgsCall = 0;

	// chartCall counts the chart's reads, likewise.
	let chartCall = 0;

	// pendingAdjust is the adjustment last sent whose outcome is unknown:
	// sent again unchanged, it goes with the same reference, so it applies
	// once.
	let pendingAdjust = null;

	// pendingPlan is the plan last sent whose outcome is unknown, likewise.
	let pendingPlan = null;

	// pendingGrant is the grant last sent whose outcome is unknown, likewise.
	let pendingGrant = null;

	// voiding is the id of the grant the void form is open for.
	let voiding = '';

	// The budgets listed so far, in the API's order, the subject to list
	// from next ('' when all are listed), and the org's default budget, or
	// null. budgetsCall counts the list's calls, so that only the latest
	// one's answer is shown.
	let budgetsListed = [];
	let budgetsNext = '';
	let defaultBudget = null;
	let budgetsCall = 0;

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

	// newReference is a random reference of a write: sent again, it applies
	// once.
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

	// say tells an outcome in where (the page's status line by default).
	function say(message, where = page) {
		where.error.textContent = '';
		where.status.textContent = message;
	}

	// fail tells a refusal in where (the page's alert by default).
	function fail(what, err, where = page) {
		where.status.textContent = '';
		where.error.textContent = what + ': ' + err.message;
		if (err.status === 401) {
			el.token.focus();
		}
	}

	// clearPlaces empties every action's messages, for another org.
	function clearPlaces() {
		for (const p of Object.values(places)) {
			p.status.textContent = '';
			p.error.textContent = '';
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
		// allowance_remaining is the allowance's grants less the debt: the
		// console shows the two apart, the debt as debt.
		const debt = acct.debt || 0;
		el.allowanceRemaining.textContent = number.format(acct.allowance_remaining + debt);
		el.debt.textContent = number.format(debt);
		el.debtFigure.hidden = debt <= 0;
		el.purchased.textContent = number.format(acct.purchased);
		el.promotional.textContent = number.format(acct.promotional || 0);
		el.nextRecharge.replaceChildren(timeElement(acct.next_recharge, longDate.format(new Date(acct.next_recharge))));

		let plan = 'Plan: ' + planText(acct.plan) + (acct.own_plan ? '.' : ' (the default plan).');
		if (acct.next_plan) {
			plan += ' From the next recharge: ' + planText(acct.next_plan) + '.';
		}
		el.plan.textContent = plan;
		el.period.replaceChildren('(since ', timeElement(acct.period_start, longDate.format(new Date(acct.period_start))), ')');
		renderUsage(acct.used || {});
		el.account.hidden = false;
		updateListed(acct.org, acct.balance);
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

	// cellOf returns a function that appends a cell of text (and class cls)
	// to the table row tr, and returns it.
	function cellOf(tr) {
		return (text, cls) => {
			const td = document.createElement('td');
			if (cls) {
				td.className = cls;
			}
			td.textContent = text;
			tr.append(td);
			return td;
		};
	}

	// utcText is an RFC 3339 time as the tables show it: UTC, to the second.
	function utcText(iso) {
		return iso.replace('T', ' ').replace(/(\.\d+)?Z$/, '');
	}

	function renderEvents(events) {
		el.events.replaceChildren(...events.map((ev) => {
			const tr = document.createElement('tr');
			const cell = cellOf(tr);
			const when = cell('');
			when.append(timeElement(ev.time, utcText(ev.time)));
			cell(ev.kind);
			cell(ev.feature || '');
			cell((ev.delta > 0 ? '+' : '') + number.format(ev.delta), 'num');
			cell(number.format(ev.balance), 'num');
			cell(ev.ref || '', 'ref').title = ev.ref || '';
			cell(ev.reason || '', 'reason').title = ev.reason || '';
			return tr;
		}));
	}

	// The holds last listed, to show again when the leases' toggle changes.
	let holdsShown = [];

	// renderHolds lists the holds, each live one with Capture and Release.
	// A gateway's lease is the gateway's to end, so it has neither, and is
	// listed only while "Show the gateways' leases" is checked.
	function renderHolds(holds) {
		holdsShown = holds;
		const isLease = (h) => h.hold.startsWith('lease:');
		const leases = holds.filter(isLease).length;
		const listed = el.showLeases.checked ? holds : holds.filter((h) => !isLease(h));
		el.leasesToggle.hidden = leases === 0;
		el.leasesCount.textContent = '(' + leases + ')';
		el.holds.replaceChildren(...listed.map((h) => {
			const tr = document.createElement('tr');
			tr.dataset.hold = h.hold;
			const cell = cellOf(tr);
			const lease = isLease(h);
			if (lease) {
				tr.className = 'lease';
			}
			cell(lease ? h.hold + ' (gateway lease)' : h.hold, 'ref').title = h.hold;
			cell(h.state);
			cell(h.feature || '');
			cell(number.format(h.state === 'captured' ? h.captured || 0 : h.amount), 'num');
			cell('').append(timeElement(h.expires, utcText(h.expires)));
			// The buttons in a box of their own: the cell stays a table
			// cell, in line with its column.
			const actions = document.createElement('div');
			actions.className = 'cell-actions';
			cell('', 'row-actions').append(actions);
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
		el.holdsTable.hidden = listed.length === 0;
		el.holdsEmpty.hidden = listed.length !== 0;
		el.holdsEmpty.textContent = leases > 0 && !el.showLeases.checked ? 'No holds but the gateways\' leases.' : 'No holds.';
	}

	// renderGrants lists the grants, each live or pending one of its own
	// (not the plan's allowance or the standing purchased credits) with
	// Void, which opens the void form for it.
	function renderGrants(grants) {
		el.grants.replaceChildren(...grants.map((g) => {
			const tr = document.createElement('tr');
			tr.dataset.grant = g.grant;
			tr.dataset.state = g.state;
			const cell = cellOf(tr);
			cell(g.grant, 'ref');
			cell(g.kind);
			cell(g.state);
			cell(number.format(g.remaining) + ' of ' + number.format(g.amount), 'num');
			cell(String(g.priority), 'num');
			const expires = cell(g.expires ? '' : 'never', 'expires');
			if (g.expires) {
				expires.append(timeElement(g.expires, utcText(g.expires)));
			}
			cell(g.reason || '', 'reason').title = g.reason || '';
			const actions = document.createElement('div');
			actions.className = 'cell-actions';
			cell('', 'row-actions').append(actions);
			if ((g.state === 'live' || g.state === 'pending') && /^g\d+$/.test(g.grant)) {
				const button = document.createElement('button');
				button.type = 'button';
				button.className = 'void secondary';
				button.textContent = 'Void';
				button.setAttribute('aria-label', 'Void grant ' + g.grant);
				button.addEventListener('click', () => openVoid(g.grant));
				actions.append(button);
			}
			return tr;
		}));
		if (voiding && !grants.some((g) => g.grant === voiding && (g.state === 'live' || g.state === 'pending'))) {
			closeVoid();
		}
	}

	function openVoid(id) {
		voiding = id;
		el.voidGrant.textContent = id;
		el.voidReason.value = '';
		el.voidReason.removeAttribute('aria-invalid');
		places.void.status.textContent = '';
		places.void.error.textContent = '';
		el.voidForm.hidden = false;
		el.voidReason.focus();
	}

	function closeVoid() {
		voiding = '';
		el.voidForm.hidden = true;
	}

	// The budgets: the org's default, and a page at a time of the subjects
	// with a budget of their own, each with Remove.

	// The windows of a budget, in the words of a limit ("50 credits a day")
	// and of the table.
	const WINDOWS = {
		day: { per: 'a day', name: 'day' },
		week: { per: 'a week', name: 'week' },
		month: { per: 'a month', name: 'month' },
		period: { per: 'a credit period', name: 'credit period' },
	};

	function budgetText(b) {
		return credits(b.limit) + ' ' + (WINDOWS[b.window] ? WINDOWS[b.window].per : 'per ' + b.window);
	}

	function budgetRow(b) {
		const tr = document.createElement('tr');
		tr.dataset.subject = b.subject;
		const cell = cellOf(tr);
		cell(b.subject, 'ref').title = b.subject;
		cell(number.format(b.spent) + ' of ' + number.format(b.limit), 'num');
		cell(number.format(b.remaining), b.remaining > 0 ? 'num' : 'num budget-spent');
		cell(WINDOWS[b.window] ? WINDOWS[b.window].name : b.window);
		cell('').append(timeElement(b.resets, utcText(b.resets)));
		const actions = document.createElement('div');
		actions.className = 'cell-actions';
		cell('', 'row-actions').append(actions);
		const remove = document.createElement('button');
		remove.type = 'button';
		remove.className = 'remove secondary';
		remove.textContent = 'Remove';
		remove.setAttribute('aria-label', 'Remove the budget of ' + b.subject);
		remove.addEventListener('click', () => busyButton(remove, () => removeBudget(b.subject)));
		actions.append(remove);
		return tr;
	}

	// renderBudgets shows a page of the API's budgets: the first, or with
	// more, the next after those listed.
	function renderBudgets(data, more) {
		budgetsListed = (more ? budgetsListed : []).concat(data.budgets || []);
		budgetsNext = data.next || '';
		defaultBudget = data.default || null;
		el.defaultBudgetText.textContent = defaultBudget ? budgetText(defaultBudget) : 'none';
		el.defaultRemove.hidden = !defaultBudget;
		el.budgets.replaceChildren(...budgetsListed.map(budgetRow));
		el.budgetsTable.hidden = budgetsListed.length === 0;
		el.budgetsEmpty.hidden = budgetsListed.length !== 0;
		el.budgetsMore.hidden = budgetsNext === '';
		el.budgetsCount.textContent = budgetsListed.length === 0 ? '' : number.format(budgetsListed.length) +
			(budgetsListed.length === 1 ? ' budget' : ' budgets') + ' listed' + (budgetsNext ? '; More lists the next ones.' : '.');
	}

	// budgetsQuery is the query of a page of budgets: the next after those
	// listed or, reloaded, as many as were listed, so a change keeps the
	// list as long as it was.
	function budgetsQuery(more) {
		if (more) {
			return '?limit=' + BUDGETS_PAGE + '&after=' + encodeURIComponent(budgetsNext);
		}
		return '?limit=' + Math.min(MAX_BUDGETS_PAGE, Math.max(BUDGETS_PAGE, budgetsListed.length));
	}

	async function loadBudgets(org, more) {
		const n = ++budgetsCall;
		const data = await call('GET', orgPath(org, 'budgets') + budgetsQuery(more));
		if (n === budgetsCall) {
			renderBudgets(data, more);
		}
	}

	// setBudget sets the budget of the subject typed, or the org's default.
	// A budget set twice is set once, so a retry needs no reference.
	async function setBudget() {
		const org = shown.org;
		const forDefault = el.budgetForDefault.checked;
		const subject = el.budgetSubject.value.trim();
		el.budgetSubject.removeAttribute('aria-invalid');
		if (!forDefault && subject === '') {
			// An empty subject names no path of the API: say so here.
			el.budgetSubject.setAttribute('aria-invalid', 'true');
			fail('Budget not sent', new Error('type the subject, or choose the default'), places.budget);
			el.budgetSubject.focus();
			return;
		}
		const limit = el.budgetLimit.value.trim();
		const body = jsonObject([
			['limit', limit === '' ? undefined : jsonNumber(limit)],
			['window', JSON.stringify(el.budgetWindow.value)],
		]);
		const path = forDefault ? orgPath(org, 'default-budget') : orgPath(org, 'budgets/' + encodeURIComponent(subject));
		try {
			const b = await call('PUT', path, body);
			el.budgetSubject.value = '';
			el.budgetLimit.value = '';
			await loadBudgets(org, false).catch(() => {});
			say(forDefault
				? 'Default budget of ' + org + ' set: ' + budgetText(b) + ', for each subject with no budget of its own.'
				: 'Budget of ' + subject + ' set: ' + budgetText(b) + '; ' + number.format(b.spent) + ' spent, ' +
					credits(b.remaining) + ' left until ' + utcText(b.resets) + ' UTC.', places.budget);
		} catch (err) {
			fail('Budget refused', err, places.budget);
			if (outcomeUnknown(err)) {
				places.budget.status.textContent = 'Press Set budget again to retry: a budget set twice is set once.';
			}
		}
		// The outcome is under the button, which may be at the bottom of
		// the window, and a new row above the form moves it down.
		inView(places.budget);
	}

	// removeBudget removes the budget of subject or, without one, the
	// org's default.
	async function removeBudget(subject) {
		const org = shown.org;
		const where = subject ? places.budgets : places.defaultBudget;
		const path = subject ? orgPath(org, 'budgets/' + encodeURIComponent(subject)) : orgPath(org, 'default-budget');
		try {
			await call('DELETE', path);
			await loadBudgets(org, false).catch(() => {});
			if (!subject) {
				say('Default budget of ' + org + ' removed: the subjects with no budget of their own have no limit now.', where);
			} else {
				say('Budget of ' + subject + ' removed' + (defaultBudget
					? ': the default budget, ' + budgetText(defaultBudget) + ', applies to it now.'
					: ': it has no limit now.'), where);
			}
		} catch (err) {
			fail('Removal of ' + (subject ? 'the budget of ' + subject : 'the default budget') + ' refused', err, where);
			if (outcomeUnknown(err)) {
				where.status.textContent = 'Press Remove again to retry: a budget is removed once.';
			}
		}
	}

	// inView scrolls the outcome of where into view, if it is not.
	function inView(where) {
		const shownPart = where.error.textContent ? where.error : where.status;
		shownPart.scrollIntoView({ block: 'nearest' });
	}

	// chooseBudgetFor shows the subject's field only for a subject's budget.
	function chooseBudgetFor() {
		el.budgetSubject.closest('.field').hidden = el.budgetForDefault.checked;
		el.budgetSubject.removeAttribute('aria-invalid');
	}

	// The org list. Each org is a button that opens it; the search box
	// hides the ones whose id does not contain what is typed.

	function orgItem(org, balance) {
		const li = document.createElement('li');
		const button = document.createElement('button');
		button.type = 'button';
		button.className = 'org-item';
		button.dataset.org = org;
		const name = document.createElement('span');
		name.className = 'org-id';
		name.textContent = org;
		const figure = document.createElement('span');
		figure.className = 'org-balance';
		button.append(name, figure);
		button.addEventListener('click', () => {
			el.org.value = org;
			busy(el.lookup, show);
		});
		li.append(button);
		const item = { li, button, figure, balance: 0 };
		setListedBalance(item, balance);
		return item;
	}

	function setListedBalance(item, balance) {
		item.balance = balance;
		item.button.dataset.balance = String(balance);
		item.figure.textContent = credits(balance);
	}

	// updateListed shows a new balance of a listed org, and which org is open.
	function updateListed(org, balance) {
		const item = listed.get(org);
		if (item) {
			setListedBalance(item, balance);
		}
		for (const [id, it] of listed) {
			if (id === org) {
				it.button.setAttribute('aria-current', 'true');
			} else {
				it.button.removeAttribute('aria-current');
			}
		}
	}

	function filterOrgs() {
		const q = el.orgSearch.value.trim().toLowerCase();
		let matches = 0;
		for (const [org, item] of listed) {
			item.li.hidden = q !== '' && !org.toLowerCase().includes(q);
			if (!item.li.hidden) {
				matches++;
			}
		}
		if (!orgsLoaded) {
			return;
		}
		const more = orgsNext ? '; More lists the next ones' : '';
		if (q === '') {
			el.orgsCount.textContent = listed.size === 0
				? 'Redis holds no organizations yet.'
				: number.format(listed.size) + (listed.size === 1 ? ' organization' : ' organizations') + ' listed' + more + '.';
		} else {
			el.orgsCount.textContent = number.format(matches) + ' of ' + number.format(listed.size) +
				' listed match ' + JSON.stringify(el.orgSearch.value.trim()) + more +
				(matches === 0 ? '. Open goes to that id.' : '.');
		}
	}

	// loadOrgs lists the first page of orgs again or, with more, the next.
	async function loadOrgs(more) {
		const n = ++orgsCall;
		const after = more ? orgsNext : '';
		try {
			const data = await call('GET', 'orgs?limit=' + ORGS_PAGE + (after ? '&after=' + encodeURIComponent(after) : ''));
			if (n !== orgsCall) {
				return;
			}
			if (!more) {
				listed.clear();
				el.orgList.replaceChildren();
			}
			for (const o of data.orgs || []) {
				const item = orgItem(o.org, o.balance);
				listed.set(o.org, item);
				el.orgList.append(item.li);
			}
			orgsNext = data.next || '';
			orgsLoaded = true;
			el.orgsMore.hidden = orgsNext === '';
			if (shown) {
				updateListed(shown.org, shown.balance);
			}
			filterOrgs();
		} catch (err) {
			if (n === orgsCall) {
				el.orgsCount.textContent = 'Could not list the organizations: ' + err.message;
			}
		}
	}

	// The chart of the credits used per day: a stacked bar a day, a colour
	// a feature. The summary and the table say the same in text.

	function isoDate(ms) {
		return new Date(ms).toISOString().slice(0, 10);
	}

	function dayMs(date) {
		return Date.parse(date + 'T00:00:00Z');
	}

	function chartDays() {
		const checked = el.chartRange.querySelector('input:checked');
		return Number(checked ? checked.value : 30);
	}

	function svg(name, attrs) {
		const e = document.createElementNS(SVG, name);
		for (const [k, v] of Object.entries(attrs || {})) {
			e.setAttribute(k, String(v));
		}
		return e;
	}

	// niceStep is a step of 1, 2 or 5 times a power of ten, at least 1,
	// about a quarter of max.
	function niceStep(max) {
		const rough = Math.max(1, max / 4);
		const p = 10 ** Math.floor(Math.log10(rough));
		const m = rough / p;
		return Math.max(1, (m <= 1 ? 1 : m <= 2 ? 2 : m <= 5 ? 5 : 10) * p);
	}

	function dayText(day) {
		const parts = Object.entries(day.used).map(([f, n]) => f + ' ' + number.format(n));
		return longDate.format(new Date(dayMs(day.date))) + ': ' + credits(day.total) +
			(parts.length ? ' (' + parts.join(', ') + ')' : '');
	}

	function renderChart(data, from, to) {
		const days = (data.days || []).map((d) => {
			const used = {};
			let total = 0;
			for (const [f, n] of Object.entries(d.used || {})) {
				used[f] = Number(n) || 0;
				total += used[f];
			}
			return { date: d.date, used, total };
		});
		// The features, the most used first, keep one colour throughout.
		const totals = new Map();
		for (const d of days) {
			for (const [f, n] of Object.entries(d.used)) {
				totals.set(f, (totals.get(f) || 0) + n);
			}
		}
		const features = [...totals.keys()].sort((a, b) => totals.get(b) - totals.get(a) || a.localeCompare(b));
		const series = new Map(features.map((f, i) => [f, 's' + (i % SERIES)]));

		const { width, height, left, right, top, bottom } = CHART;
		const plotW = width - left - right, plotH = height - top - bottom;
		const max = Math.max(0, ...days.map((d) => d.total));
		const step = niceStep(max);
		const ceiling = Math.max(step, Math.ceil(max / step) * step);
		const y = (v) => top + plotH - plotH * v / ceiling;

		const root = svg('svg', {
			viewBox: '0 0 ' + width + ' ' + height, role: 'img', class: 'chart-svg',
			'aria-label': 'Credits used per day, ' + from + ' to ' + to + ', a stacked bar a day',
		});
		root.dataset.from = from;
		root.dataset.to = to;
		root.dataset.days = String(days.length);
		const grid = svg('g', { class: 'chart-grid', 'aria-hidden': 'true' });
		for (let v = 0; v <= ceiling; v += step) {
			grid.append(svg('line', { x1: left, x2: width - right, y1: y(v), y2: y(v) }));
			const label = svg('text', { x: left - 6, y: y(v) + 4, 'text-anchor': 'end', class: 'chart-axis' });
			label.textContent = number.format(v);
			grid.append(label);
		}
		root.append(grid);

		const slot = plotW / Math.max(1, days.length);
		const barW = Math.max(1, slot * 0.75);
		const bars = svg('g', { class: 'chart-bars' });
		const axis = svg('g', { class: 'chart-x', 'aria-hidden': 'true' });
		// Below two months, a date every few days; above, each month's first.
		const every = Math.ceil(64 / slot);
		days.forEach((d, i) => {
			const x = left + i * slot;
			const g = svg('g', { class: 'chart-day' });
			g.dataset.date = d.date;
			g.dataset.total = String(d.total);
			const title = svg('title');
			title.textContent = dayText(d);
			g.append(title, svg('rect', { class: 'chart-hit', x, y: top, width: slot, height: plotH }));
			let base = 0;
			for (const f of features) {
				const n = d.used[f];
				if (!n) {
					continue;
				}
				const seg = svg('rect', {
					class: 'chart-seg ' + series.get(f), x: x + (slot - barW) / 2,
					y: y(base + n), width: barW, height: y(base) - y(base + n),
				});
				seg.dataset.feature = f;
				seg.dataset.used = String(n);
				g.append(seg);
				base += n;
			}
			bars.append(g);

			const date = new Date(dayMs(d.date));
			let label = '';
			if (days.length <= 60) {
				label = i % every === 0 ? dayMonth.format(date) : '';
			} else if (date.getUTCDate() === 1) {
				label = date.getUTCMonth() === 0 ? monthYear.format(date) : monthOnly.format(date);
			}
			if (label) {
				axis.append(svg('line', { x1: x + slot / 2, x2: x + slot / 2, y1: top + plotH, y2: top + plotH + 4 }));
				const text = svg('text', { x: x + slot / 2, y: height - 10, 'text-anchor': 'middle', class: 'chart-axis' });
				text.textContent = label;
				axis.append(text);
			}
		});
		root.append(bars, axis, svg('line', { class: 'chart-base', x1: left, x2: width - right, y1: top + plotH, y2: top + plotH }));
		el.chart.replaceChildren(root);
		el.chart.dataset.state = 'ready';

		el.chartLegend.replaceChildren(...features.map((f) => {
			const li = document.createElement('li');
			li.dataset.feature = f;
			const swatch = document.createElement('span');
			swatch.className = 'swatch ' + series.get(f);
			swatch.setAttribute('aria-hidden', 'true');
			li.append(swatch, f + ' ' + credits(totals.get(f)));
			return li;
		}));
		el.chartLegend.hidden = features.length === 0;

		const sum = days.reduce((s, d) => s + d.total, 0);
		const span = longDate.format(new Date(dayMs(from))) + ' to ' + longDate.format(new Date(dayMs(to))) +
			' (' + number.format(days.length) + ' days, UTC)';
		if (sum === 0) {
			el.chartSummary.textContent = 'No credits used from ' + span + '.';
		} else {
			const busiest = days.reduce((a, b) => (b.total > a.total ? b : a));
			el.chartSummary.textContent = credits(sum) + ' used from ' + span + ': ' +
				features.map((f) => f + ' ' + number.format(totals.get(f))).join(', ') +
				'. The most on ' + dayText(busiest) + '.';
		}

		const th = (text, cls) => {
			const e = document.createElement('th');
			e.scope = 'col';
			if (cls) {
				e.className = cls;
			}
			e.textContent = text;
			return e;
		};
		el.usageTableHead.replaceChildren(th('Date (UTC)'), ...features.map((f) => th(f, 'num')), th('Total', 'num'));
		el.usageTable.replaceChildren(...days.map((d) => {
			const tr = document.createElement('tr');
			tr.dataset.date = d.date;
			const date = document.createElement('th');
			date.scope = 'row';
			date.textContent = d.date;
			tr.append(date);
			for (const v of [...features.map((f) => d.used[f] || 0), d.total]) {
				const td = document.createElement('td');
				td.className = 'num';
				td.textContent = number.format(v);
				tr.append(td);
			}
			return tr;
		}));
	}

	// refreshChart reads the org's usage per day over the range chosen,
	// ending today (UTC).
	async function refreshChart(org) {
		const n = ++chartCall;
		const days = chartDays();
		const now = Date.now();
		const to = isoDate(now), from = isoDate(now - (days - 1) * DAY_MS);
		el.chart.dataset.state = 'loading';
		el.chart.setAttribute('aria-busy', 'true');
		try {
			const data = await call('GET', orgPath(org, 'usage') + '?from=' + from + '&to=' + to);
			if (n === chartCall) {
				renderChart(data, from, to);
			}
		} catch (err) {
			if (n === chartCall) {
				el.chart.dataset.state = 'error';
				const p = document.createElement('p');
				p.className = 'chart-message';
				p.textContent = 'The usage per day could not be read: ' + err.message;
				el.chart.replaceChildren(p);
				el.chartLegend.replaceChildren();
				el.chartSummary.textContent = '';
				el.usageTableHead.replaceChildren();
				el.usageTable.replaceChildren();
			}
		} finally {
			if (n === chartCall) {
				el.chart.removeAttribute('aria-busy');
			}
		}
	}

	// An adjustment is checked here as the API checks it, with the API's
	// words, so that a mistake costs no call.

	class InputError extends Error {
		constructor(field, value, reason) {
			super('invalid ' + field + ' ' + JSON.stringify(value.length > 80 ? value.slice(0, 80) + '...' : value) + ': ' + reason);
			this.field = field;
		}
	}

	// adjustAmount is the amount typed, as a JSON integer, or throws.
	function adjustAmount(text) {
		const s = text.trim();
		const reason = 'must be ' + (-MAX_AMOUNT) + ' to ' + MAX_AMOUNT + ', and not 0';
		if (!/^-?\d+$/.test(s)) {
			throw new InputError('amount', s, reason);
		}
		const n = BigInt(s);
		if (n === 0n || n > MAX_AMOUNT || n < -MAX_AMOUNT) {
			throw new InputError('amount', n.toString(), reason);
		}
		return n.toString();
	}

	// checkReason throws unless reason is 1 to MAX_REASON bytes of text
	// without control characters (one line), not only spaces.
	function checkReason(reason) {
		const bad = reason === '' || new TextEncoder().encode(reason).length > MAX_REASON ||
			/\p{Cc}|\p{Cs}/u.test(reason) ||
			/^[\t\n\v\f\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]*$/.test(reason);
		if (bad) {
			throw new InputError('reason', reason, 'must be 1 to ' + MAX_REASON + ' bytes of text without control characters');
		}
	}

	async function adjust() {
		const org = shown.org;
		el.adjustAmount.removeAttribute('aria-invalid');
		el.adjustReason.removeAttribute('aria-invalid');
		const reason = el.adjustReason.value;
		let amount;
		try {
			amount = adjustAmount(el.adjustAmount.value);
			checkReason(reason);
		} catch (err) {
			const field = err.field === 'amount' ? el.adjustAmount : el.adjustReason;
			field.setAttribute('aria-invalid', 'true');
			fail('Adjustment not sent', err, places.adjust);
			field.focus();
			return;
		}
		const again = pendingAdjust && pendingAdjust.org === org &&
			pendingAdjust.amount === amount && pendingAdjust.reason === reason;
		const reference = again ? pendingAdjust.reference : newReference();
		pendingAdjust = { org, amount, reason, reference };
		const body = jsonObject([
			['amount', amount],
			['reason', JSON.stringify(reason)],
			['reference', JSON.stringify(reference)],
		]);
		try {
			const acct = await call('POST', orgPath(org, 'adjust'), body);
			pendingAdjust = null;
			renderAccount(acct);
			el.adjustAmount.value = '';
			el.adjustReason.value = '';
			await Promise.all([refreshGrants(org), refreshEvents(org), refreshChart(org)]).catch(() => {});
			say('Adjusted ' + org + ' by ' + (amount.startsWith('-') ? '' : '+') + credits(Number(amount)) +
				': ' + JSON.stringify(reason) + '. Balance: ' + credits(acct.balance) + '.', places.adjust);
		} catch (err) {
			fail('Adjustment refused', err, places.adjust);
			if (outcomeUnknown(err)) {
				places.adjust.status.textContent = 'Press Apply adjustment again to retry: it goes with the same reference, ' +
					reference + ', and applies once.';
			} else {
				pendingAdjust = null;
			}
		}
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

	async function refreshGrants(org) {
		const data = await call('GET', orgPath(org, 'grants'));
		renderGrants(data.grants || []);
	}

	// grantExpiry is what the admin typed as a grant's expiry, for the API:
	// a date is its midnight UTC; anything else goes as typed, for the API
	// to check.
	function grantExpiry(text) {
		const s = text.trim();
		if (s === '') {
			return undefined;
		}
		return JSON.stringify(/^\d{4}-\d{2}-\d{2}$/.test(s) ? s + 'T00:00:00Z' : s);
	}

	async function giveGrant() {
		const org = shown.org;
		const amount = el.grantAmount.value.trim();
		const expires = grantExpiry(el.grantExpires.value);
		const reason = el.grantReason.value;
		const again = pendingGrant && pendingGrant.org === org && pendingGrant.amount === amount &&
			pendingGrant.expires === expires && pendingGrant.reason === reason;
		const reference = again ? pendingGrant.reference : newReference();
		pendingGrant = { org, amount, expires, reason, reference };
		const body = jsonObject([
			['amount', amount === '' ? undefined : jsonNumber(amount)],
			['expires', expires],
			['reason', reason === '' ? undefined : JSON.stringify(reason)],
			['reference', JSON.stringify(reference)],
		]);
		try {
			const data = await call('POST', orgPath(org, 'grants'), body);
			pendingGrant = null;
			renderAccount(data.account);
			el.grantAmount.value = '';
			el.grantExpires.value = '';
			el.grantReason.value = '';
			await Promise.all([refreshGrants(org), refreshEvents(org)]).catch(() => {});
			const g = data.grant || {};
			say('Gave ' + org + ' ' + credits(g.amount || 0) + ' as grant ' + (g.grant || '?') +
				(g.expires ? ', expiring ' + utcText(g.expires) + ' UTC' : ', never expiring') +
				'. Balance: ' + credits(data.account.balance) + '.', places.grant);
		} catch (err) {
			fail('Grant refused', err, places.grant);
			if (outcomeUnknown(err)) {
				places.grant.status.textContent = 'Press Give credits again to retry: it goes with the same reference, ' +
					reference + ', and applies once.';
			} else {
				pendingGrant = null;
			}
		}
	}

	// voidGrant voids the grant the void form is open for, with the reason
	// typed; a grant is voided once, however often it is sent.
	async function voidGrant() {
		const org = shown.org;
		const id = voiding;
		const reason = el.voidReason.value;
		el.voidReason.removeAttribute('aria-invalid');
		try {
			checkReason(reason);
		} catch (err) {
			el.voidReason.setAttribute('aria-invalid', 'true');
			fail('Void not sent', err, places.void);
			el.voidReason.focus();
			return;
		}
		try {
			const acct = await call('DELETE', orgPath(org, 'grants/' + encodeURIComponent(id)), jsonObject([['reason', JSON.stringify(reason)]]));
			closeVoid();
			renderAccount(acct);
			await Promise.all([refreshGrants(org), refreshEvents(org)]).catch(() => {});
			say('Grant ' + id + ' voided: ' + JSON.stringify(reason) + '. Balance: ' + credits(acct.balance) + '.', places.grants);
		} catch (err) {
			fail('Void of grant ' + id + ' refused', err, places.void);
			if (outcomeUnknown(err)) {
				places.void.status.textContent = 'Press Void grant again to retry: a grant is voided once.';
			}
		}
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
			await Promise.all([refreshHolds(org), refreshGrants(org), refreshEvents(org)]).catch(() => {});
			const h = acct.hold || {};
			say(h.state === 'captured'
				? 'Hold ' + id + ' captured: ' + credits(h.captured || 0) + ' charged. Available: ' + credits(acct.available) + '.'
				: 'Hold ' + id + ' ' + (h.state || 'ended') + '. Available: ' + credits(acct.available) + '.', places.holds);
		} catch (err) {
			fail(what + ' of hold ' + id + ' refused', err, places.holds);
			if (outcomeUnknown(err)) {
				places.holds.status.textContent = 'Press ' + what + ' again to retry: a hold ends once.';
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
			const n = ++budgetsCall;
			const [acct, events, holds, grants, budgets] = await Promise.all([
				call('GET', orgPath(org)),
				call('GET', orgPath(org, 'events') + '?limit=' + EVENTS_SHOWN),
				call('GET', orgPath(org, 'holds')),
				call('GET', orgPath(org, 'grants')),
				call('GET', orgPath(org, 'budgets') + '?limit=' + BUDGETS_PAGE),
			]);
			closeVoid();
			if (!shown || shown.org !== acct.org) {
				clearPlaces();
			}
			renderAccount(acct);
			renderEvents(events.events || []);
			renderHolds(holds.holds || []);
			renderGrants(grants.grants || []);
			if (n === budgetsCall) {
				renderBudgets(budgets, false);
			}
			fillPlanForm(acct);
			say('Showing organization ' + acct.org + '.');
			refreshChart(acct.org);
			if (!orgsLoaded) {
				loadOrgs(false);
			}
		} catch (err) {
			shown = null;
			chartCall++;
			el.account.hidden = true;
			updateListed('', 0);
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
		const before = shown;
		try {
			const acct = await call('POST', orgPath(org, 'topup'), body);
			renderAccount(acct);
			el.amount.value = '';
			el.reference.value = '';
			await Promise.all([refreshGrants(org), refreshEvents(org)]).catch(() => {});
			// A top-up repays the debt first: what it added is what the
			// purchased credits grew by, plus the debt it repaid.
			const repaid = (before.debt || 0) - (acct.debt || 0);
			const added = acct.purchased - before.purchased + Math.max(0, repaid);
			if (added <= 0) {
				say('Reference ' + JSON.stringify(reference) + ' was already applied to ' + org + '; nothing changed.', places.topup);
			} else {
				say('Added ' + credits(added) + ' to ' + org + (repaid > 0 ? ', ' + number.format(repaid) + ' of them to repay its debt' : '') +
					'. Balance: ' + credits(acct.balance) + '.', places.topup);
			}
		} catch (err) {
			fail('Top-up refused', err, places.topup);
			if (outcomeUnknown(err)) {
				places.topup.status.textContent = 'The reference ' + reference + ' stays in the form: press Add credits again to retry; it applies once.';
			}
		}
	}

	async function setPlan() {
		const org = shown.org;
		const allowance = el.allowance.value.trim();
		const month = el.month.value;
		const again = pendingPlan && pendingPlan.org === org &&
			pendingPlan.allowance === allowance && pendingPlan.month === month;
		const reference = again ? pendingPlan.reference : newReference();
		pendingPlan = { org, allowance, month, reference };
		const body = jsonObject([
			['allowance', allowance === '' ? undefined : jsonNumber(allowance)],
			['recharge_month', jsonNumber(month)],
			['reference', JSON.stringify(reference)],
		]);
		try {
			const acct = await call('PUT', orgPath(org, 'plan'), body);
			pendingPlan = null;
			renderAccount(acct);
			fillPlanForm(acct);
			await Promise.all([refreshGrants(org), refreshEvents(org)]).catch(() => {});
			say(acct.next_plan
				? 'The new plan of ' + org + ' applies from ' + longDate.format(new Date(acct.next_recharge)) + '.'
				: 'Plan of ' + org + ' set: ' + planText(acct.plan) + '.', places.plan);
		} catch (err) {
			fail('Plan refused', err, places.plan);
			if (outcomeUnknown(err)) {
				places.plan.status.textContent = 'Press Set plan again to retry: it goes with the same reference, ' +
					reference + ', and applies once.';
			} else {
				pendingPlan = null;
			}
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
	el.adjust.addEventListener('submit', (ev) => {
		ev.preventDefault();
		busy(el.adjust, adjust);
	});
	el.grantForm.addEventListener('submit', (ev) => {
		ev.preventDefault();
		busy(el.grantForm, giveGrant);
	});
	el.voidForm.addEventListener('submit', (ev) => {
		ev.preventDefault();
		busy(el.voidForm, voidGrant);
	});
	el.voidCancel.addEventListener('click', closeVoid);
	el.budgetForm.addEventListener('submit', (ev) => {
		ev.preventDefault();
		busy(el.budgetForm, setBudget);
	});
	el.budgetForSubject.addEventListener('change', chooseBudgetFor);
	el.budgetForDefault.addEventListener('change', chooseBudgetFor);
	el.budgetSubject.addEventListener('input', () => el.budgetSubject.removeAttribute('aria-invalid'));
	el.defaultRemove.addEventListener('click', () => busyButton(el.defaultRemove, () => removeBudget('')));
	el.budgetsMore.addEventListener('click', () => busyButton(el.budgetsMore, () => loadBudgets(shown.org, true)
		.catch((err) => fail('Could not list more budgets', err, places.budgets))));
	el.showLeases.addEventListener('change', () => renderHolds(holdsShown));
	el.voidReason.addEventListener('input', () => el.voidReason.removeAttribute('aria-invalid'));
	el.orgSearch.addEventListener('input', filterOrgs);
	el.orgSearchForm.addEventListener('submit', (ev) => {
		ev.preventDefault();
		const org = el.orgSearch.value.trim();
		if (org !== '') {
			el.org.value = org;
			busy(el.orgSearchForm, show);
		}
	});
	el.orgsReload.addEventListener('click', () => busyButton(el.orgsReload, () => loadOrgs(false)));
	el.orgsMore.addEventListener('click', () => busyButton(el.orgsMore, () => loadOrgs(true)));
	el.chartRange.addEventListener('change', () => {
		if (shown) {
			refreshChart(shown.org);
		}
	});
	loadOrgs(false);
})();
