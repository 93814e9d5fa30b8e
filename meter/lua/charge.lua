-- KEYS: account, request marker, call log, holds, the request's kept
-- response (the marker again for a call without a binding). ARGV[8] feature, ARGV[9] cost, ARGV[10] 1 for overdraft,
-- ARGV[11] overdraft limit (-1: none), ARGV[12] request id, ARGV[13] marker
-- lifetime in seconds, ARGV[14] attempt id, ARGV[15] the call's binding
-- ('-' for none), ARGV[16] how long, in seconds, a call with a binding may
-- stay in flight before its key is free again.
--
-- A charge is a hold captured at once: it takes its cost of the available
-- balance (what no hold keeps), and its marker records which parts came from
-- allowance, purchased credits and debt, so that a refund gives each back to
-- where it came from.
--
-- Returns {code, balance, charged, kept}: code OK charged (or this attempt's
-- own charge, run before and repeated after a lost reply), REFUSED (nothing
-- written, not even for an org Redis has never seen), REPEAT an earlier call
-- with this request id completed (its balance and cost; kept is its kept
-- response, or false when it was too large to keep), IN_FLIGHT an earlier
-- call with this request id and a binding has not completed (charged, or
-- settled and its response not yet kept), MISMATCH the earlier call's
-- binding differs, VOIDED this attempt was voided (nothing charged). A
-- request refunded in full, refused, or voided by another attempt, is free to
-- charge again.

--#include lib/calls.lua

return charge(0, 7)
