-- Who made an operator's change: the name of the admin token of the call,
-- kept in the change's event as kind@by, one word of the event's line, so
-- that the line keeps its fields and an older reader its kind.

-- Signs acc's last event with by, when it is the change's (of kind): the
-- events that fell due before it (expiries, recharges) are the ledger's
-- own. An empty by signs nothing.
local function sign(acc, kind, by)
  local e = acc.events[#acc.events]
  if by ~= '' and e and e[1] == kind then e[1] = kind .. '@' .. by end
end
