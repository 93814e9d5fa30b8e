package meter

import (
	"errors"
)

func init() {
	ledgerCases = append(ledgerCases, voidCases...)
}

var voidCases = []ledgerCase{
	{name: "a lost reply: the same attempt answers as its first try did", cfg: plan10, run: func(e *env) {
		req := ChargeRequest{Org: "acme", Feature: "rich-text", Cost: 3, RequestID: "r1", Attempt: "a1"}
		first, err := e.ledger.Charge(e.ctx, req)
		if err != nil || !first.Charged {
			e.t.Fatalf("%+v %v", first, err)
		}
		again, err := e.ledger.Charge(e.ctx, req)
		if err != nil || !again.Charged || again.Replay || again.Balance != 7 || again.Cost != 3 {
			e.t.Fatalf("the same attempt again: %+v %v", again, err)
		}
		e.wantBalance(e.account("acme"), 7, 7, 0)
	}},
	{name: "void refunds a charge that ran", cfg: plan10, run: func(e *env) {
		if _, err := e.ledger.Charge(e.ctx, ChargeRequest{Org: "acme", Feature: "rich-text", Cost: 3, RequestID: "r1", Attempt: "a1"}); err != nil {
			e.t.Fatal(err)
		}
		refund, err := e.ledger.Void(e.ctx, "acme", "r1", "a1")
		if err != nil || refund != 3 {
			e.t.Fatalf("void: %d %v", refund, err)
		}
		if refund, err := e.ledger.Void(e.ctx, "acme", "r1", "a1"); err != nil || refund != 0 {
			e.t.Fatalf("second void: %d %v", refund, err)
		}
		a := e.account("acme")
		e.wantBalance(a, 10, 10, 0)
		if a.Used["rich-text"] != 0 {
			e.t.Fatalf("used %v", a.Used)
		}
		e.checkEvents("acme")
	}},
	{name: "void before the charge arrives stops it", cfg: plan10, run: func(e *env) {
		e.charge("acme", 1)
		refund, err := e.ledger.Void(e.ctx, "acme", "r1", "a1")
		if err != nil || refund != 0 {
			e.t.Fatalf("void: %d %v", refund, err)
		}
		_, err = e.ledger.Charge(e.ctx, ChargeRequest{Org: "acme", Feature: "rich-text", Cost: 3, RequestID: "r1", Attempt: "a1"})
		if !errors.Is(err, ErrVoided) {
			e.t.Fatalf("a voided attempt charged: %v", err)
		}
		e.wantBalance(e.account("acme"), 9, 9, 0)
		if _, err := e.ledger.Refund(e.ctx, "acme", "r1"); !errors.Is(err, ErrUnknownRequest) {
			e.t.Fatalf("settle of a voided request: %v", err)
		}
		// A client's retry with the same request id is a new attempt and
		// charges normally.
		r, err := e.ledger.Charge(e.ctx, ChargeRequest{Org: "acme", Feature: "rich-text", Cost: 3, RequestID: "r1", Attempt: "a2"})
		if err != nil || !r.Charged || r.Replay || r.Balance != 6 {
			e.t.Fatalf("retry: %+v %v", r, err)
		}
	}},
	{name: "void leaves a charge that a retry relied on", cfg: plan10, run: func(e *env) {
		if _, err := e.ledger.Charge(e.ctx, ChargeRequest{Org: "acme", Feature: "rich-text", Cost: 3, RequestID: "k", Attempt: "a1"}); err != nil {
			e.t.Fatal(err)
		}
		r, err := e.ledger.Charge(e.ctx, ChargeRequest{Org: "acme", Feature: "rich-text", Cost: 3, RequestID: "k", Attempt: "a2"})
		if err != nil || !r.Replay {
			e.t.Fatalf("retry: %+v %v", r, err)
		}
		if refund, err := e.ledger.Void(e.ctx, "acme", "k", "a1"); err != nil || refund != 0 {
			e.t.Fatalf("void of a relied-on charge: %d %v", refund, err)
		}
		e.wantBalance(e.account("acme"), 7, 7, 0)
	}},
	{name: "void of another attempt's charge does nothing", cfg: plan10, run: func(e *env) {
		if _, err := e.ledger.Charge(e.ctx, ChargeRequest{Org: "acme", Feature: "rich-text", Cost: 3, RequestID: "k", Attempt: "a1"}); err != nil {
			e.t.Fatal(err)
		}
		before := e.dump()
		if refund, err := e.ledger.Void(e.ctx, "acme", "k", "other"); err != nil || refund != 0 {
			e.t.Fatalf("void: %d %v", refund, err)
		}
		if !equalDump(before, e.dump()) {
			e.t.Fatal("a void of another attempt wrote")
		}
	}},
}
