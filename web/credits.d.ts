// Types of credits.js, the frontend helper of the credits gateway.

/** The badge's state: see credits.js. */
export type CreditsState = 'ok' | 'low' | 'exhausted';

/** An RFC 9457 problem, as the gateway answers a 402 or a 401. */
export interface CreditsProblem {
	type?: string;
	title?: string;
	status?: number;
	detail?: string;
	org?: string;
	feature?: string;
	balance?: number;
	cost?: number;
	topup_url?: string;
	/** A budget-spent problem's budget: whose, its limit, spent, and when it resets. */
	subject?: string;
	limit?: number;
	spent?: number;
	resets?: string;
	[field: string]: unknown;
}

/** The window of a budget. */
export type CreditsBudgetWindow = 'day' | 'week' | 'month' | 'period';

/**
 * The caller's budget in the org, as credits_balance answers it with a
 * budget. A call's Credits-Budget-Remaining tells only remaining: a budget
 * known from calls alone may lack the other fields.
 */
export interface CreditsBudget {
	subject?: string;
	limit?: number;
	window?: CreditsBudgetWindow;
	spent?: number;
	/** What the budget has left in its window; never below 0. */
	remaining: number;
	/** When the window ends (RFC 3339). */
	resets?: string;
	[field: string]: unknown;
}

/** The answer of a credits_balance endpoint. */
export interface CreditsBalance {
	org: string;
	balance: number;
	next_recharge: string;
	/** The caller's budget, on an endpoint with `budget` when one applies. */
	budget?: CreditsBudget;
	[field: string]: unknown;
}

/** What the badge shows, as current() answers it. */
export interface CreditsCurrent {
	balance: number;
	state: CreditsState;
	/** The caller's budget, or null when none applies. */
	budget: CreditsBudget | null;
}

/** The detail of the "credits:change" event on document. */
export interface CreditsChangeDetail {
	balance: number;
	state: CreditsState;
	/** The problem of a 402, else null. */
	problem: CreditsProblem | null;
	/** The caller's budget, or null when none applies. */
	budget: CreditsBudget | null;
}

/** The detail of the "credits:error" event on document. */
export interface CreditsErrorDetail {
	/** A TypeError when the call failed, a CreditsError when it was answered. */
	error: Error;
	url: string;
	/** The HTTP status, or 0 when there was no answer. */
	status: number;
	problem: CreditsProblem | null;
}

/** How refresh fails when the balance endpoint answered. */
export declare class CreditsError extends Error {
	constructor(message: string, status: number, problem?: CreditsProblem | null);
	readonly name: 'CreditsError';
	/** The HTTP status; 0 when the answer was not the JSON expected. */
	readonly status: number;
	readonly problem: CreditsProblem | null;
}

/** fetch, then the response's credit headers; resolves to the response, unread. */
declare function creditsFetch(input: RequestInfo | URL, init?: RequestInit): Promise<Response>;
export { creditsFetch as fetch };

/** Patches window.fetch so every response is read; returns the undo. */
export declare function watchFetch(): () => void;

/** Reads the credit headers of a response the page fetched itself. */
export declare function observe(response: Response): Promise<Response>;

/**
 * Sets the badge from a credits_balance endpoint; resolves to its JSON.
 * Rejects (and fires "credits:error") with a TypeError when the call fails,
 * with a CreditsError when it is answered with anything but a balance.
 */
export declare function refresh(url: RequestInfo | URL, init?: RequestInit): Promise<CreditsBalance>;

/** What the badge shows; null before the first balance. */
export declare function current(): CreditsCurrent | null;

/** The whole API in one object; format may be replaced. */
export interface CreditsAPI {
	fetch: typeof creditsFetch;
	watchFetch: typeof watchFetch;
	observe: typeof observe;
	refresh: typeof refresh;
	current: typeof current;
	/** The badge's wording. */
	format: (balance: number, state: CreditsState) => string;
	/** The budget's wording, after the balance: "12 of 50 left today". */
	formatBudget: (budget: CreditsBudget) => string;
	CreditsError: typeof CreditsError;
}

export declare const Credits: CreditsAPI;
export default Credits;

declare global {
	interface DocumentEventMap {
		'credits:change': CustomEvent<CreditsChangeDetail>;
		'credits:error': CustomEvent<CreditsErrorDetail>;
	}
}
