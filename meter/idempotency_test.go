package meter

import (
	"errors"
	"fmt"
	"testing"
	"time"
)

func init() {
	ledgerCases = append(ledgerCases, idempotencyCases...)
}

var idempotencyCases = []ledgerCase{
	{name: "a call with a key is charged once, in flight, then answered its kept response", cfg: plan10, run: func(e *env) {
		bind := Binding("POST", "/rich-text/x", "rich-text", 2)
		first := ChargeRequest{Org: "acme", Feature: "rich-text", Cost: 2, RequestID: "i:k1", Binding: bind}
		r, err := e.ledger.Charge(e.ctx, first)
		if err != nil || !r.Charged || r.Replay {
			e.t.Fatalf("first: %+v %v", r, err)
		}
		retry := first
		retry.Attempt = ""
		if _, err := e.ledger.Charge(e.ctx, retry); !errors.Is(err, ErrInFlight) {
			e.t.Fatalf("a retry while the first is in flight: %v", err)
		}
		other := retry
		other.Binding = Binding("POST", "/rich-text/y", "rich-text", 2)
		if _, err := e.ledger.Charge(e.ctx, other); !errors.Is(err, ErrMismatch) {
			e.t.Fatalf("another call with the key: %v", err)
		}
		if err := e.ledger.Keep(e.ctx, "acme", "i:k1", "someone-else", []byte("x")); !errors.Is(err, ErrUnknownRequest) {
			e.t.Fatalf("another attempt kept a response: %v", err)
		}
		if err := e.ledger.Keep(e.ctx, "acme", "i:k1", r.Attempt, []byte("200 the answer")); err != nil {
			e.t.Fatal(err)
		}
		got, err := e.ledger.Charge(e.ctx, retry)
		if err != nil || !got.Replay || string(got.Kept) != "200 the answer" || got.Balance != 8 {
			e.t.Fatalf("a retry after the first completed: %+v %v", got, err)
		}
		if _, err := e.ledger.Charge(e.ctx, other); !errors.Is(err, ErrMismatch) {
			e.t.Fatalf("another call with a completed key: %v", err)
		}
		// The kept response lives as long as the marker.
		if ttl := e.rdb.TTL(e.ctx, e.ledger.Keys().Kept("acme", "i:k1")).Val(); ttl < 23*time.Hour {
			e.t.Fatalf("the kept response expires in %s", ttl)
		}
		e.wantBalance(e.account("acme"), 8, 8, 0)
		e.checkEvents("acme")
	}},
	{name: "a call without a key is remembered for minutes, one with a key for a day", cfg: plan10, run: func(e *env) {
		plain := ChargeRequest{Org: "acme", Feature: "rich-text", Cost: 1, RequestID: "g:plain"}
		if r, err := e.ledger.Charge(e.ctx, plain); err != nil || !r.Charged {
			e.t.Fatalf("%+v %v", r, err)
		}
		if _, err := e.ledger.Settle(e.ctx, "acme", "g:plain", 1); err != nil {
			e.t.Fatal(err)
		}
		if ttl := e.rdb.TTL(e.ctx, e.ledger.Keys().Request("acme", "g:plain")).Val(); ttl <= DefaultMarkerTTL-time.Minute || ttl > DefaultMarkerTTL {
			e.t.Fatalf("the marker of a call without a key expires in %s, want %s", ttl, DefaultMarkerTTL)
		}
		keyed := ChargeRequest{Org: "acme", Feature: "rich-text", Cost: 1, RequestID: "i:k", Binding: "b"}
		r, err := e.ledger.Charge(e.ctx, keyed)
		if err != nil || !r.Charged {
			e.t.Fatalf("%+v %v", r, err)
		}
		if err := e.ledger.Keep(e.ctx, "acme", "i:k", r.Attempt, []byte("x")); err != nil {
			e.t.Fatal(err)
		}
		if ttl := e.rdb.TTL(e.ctx, e.ledger.Keys().Request("acme", "i:k")).Val(); ttl <= DefaultKeyTTL-time.Hour {
			e.t.Fatalf("the marker of a completed call with a key expires in %s, want %s", ttl, DefaultKeyTTL)
		}
		e.wantBalance(e.account("acme"), 8, 8, 0)
	}},
	{name: "a deferred charge of unknown outcome is not sent again once its marker may be gone", cfg: plan10, run: func(e *env) {
		charge := ChargeRequest{Org: "acme", Feature: "rich-text", Cost: 1, RequestID: "g:late", Attempt: "a1", Overdraft: true, OverdraftLimit: NoLimit}
		late := LaterCharge{Ledger: e.ledger, Charge: charge, Sent: time.Now().Add(-DefaultMarkerTTL * 9 / 10)}
		if err := late.apply(e.ctx); !errors.Is(err, ErrTooLate) {
			e.t.Fatalf("a charge sent %s ago: %v, want ErrTooLate", DefaultMarkerTTL*9/10, err)
		}
		if n := e.rdb.Exists(e.ctx, e.ledger.Keys().Account("acme")).Val(); n != 0 {
			e.t.Fatal("a charge not sent again wrote the account")
		}
		// In time, or never sent: charged.
		for i, sent := range []time.Time{time.Now().Add(-time.Minute), {}} {
			charge.RequestID, charge.Attempt = fmt.Sprintf("g:ok%d", i), fmt.Sprintf("a%d", i+2)
			if err := (LaterCharge{Ledger: e.ledger, Charge: charge, Sent: sent}).apply(e.ctx); err != nil {
				e.t.Fatalf("a charge sent at %v: %v", sent, err)
			}
		}
		e.wantBalance(e.account("acme"), 8, 8, 0)
		e.checkEvents("acme")
	}},
	{name: "a refunded key is free again, a key settled to 0 is not", cfg: plan10, run: func(e *env) {
		req := ChargeRequest{Org: "acme", Feature: "rich-text", Cost: 3, RequestID: "i:k", Binding: "b1"}
		r, err := e.ledger.Charge(e.ctx, req)
		if err != nil || !r.Charged {
			e.t.Fatalf("%+v %v", r, err)
		}
		if _, err := e.ledger.Refund(e.ctx, "acme", "i:k"); err != nil {
			e.t.Fatal(err)
		}
		// A refund can be a new call altogether.
		req.Attempt, req.Binding = "", "b2"
		r, err = e.ledger.Charge(e.ctx, req)
		if err != nil || !r.Charged || r.Replay || r.Balance != 7 {
			e.t.Fatalf("after a refund: %+v %v", r, err)
		}
		if _, err := e.ledger.Settle(e.ctx, "acme", "i:k", 0); err != nil {
			e.t.Fatal(err)
		}
		if err := e.ledger.Keep(e.ctx, "acme", "i:k", r.Attempt, nil); err != nil {
			e.t.Fatal(err)
		}
		req.Attempt = ""
		got, err := e.ledger.Charge(e.ctx, req)
		if err != nil || !got.Replay || got.Kept != nil {
			e.t.Fatalf("after a settle to 0 whose response was not kept: %+v %v", got, err)
		}
		// A refund after the response was kept changes nothing: another
		// call was answered by this one.
		if s, err := e.ledger.Refund(e.ctx, "acme", "i:k"); err != nil || !s.Repeat {
			e.t.Fatalf("a refund of a completed call: %+v %v", s, err)
		}
		e.wantBalance(e.account("acme"), 10, 10, 0)
		e.checkEvents("acme")
	}},
}

func TestBinding(t *testing.T) {
	a := Binding("POST", "/a", "f", 1)
	for _, b := range []string{Binding("GET", "/a", "f", 1), Binding("POST", "/b", "f", 1), Binding("POST", "/a", "g", 1), Binding("POST", "/a", "f", 2)} {
		if a == b {
			t.Fatalf("two calls bind alike: %s", a)
		}
	}
	if a != Binding("POST", "/a", "f", 1) {
		t.Fatal("one call binds two ways")
	}
}

func init() {
	ledgerCases = append(ledgerCases, ledgerCase{name: "a top-up voided by its reference never stands", cfg: plan10, run: func(e *env) {
		// It ran before the void: taken back.
		e.topUp("acme", 100, "gw-1")
		if err := e.ledger.VoidTopUp(e.ctx, "acme", 100, "gw-1"); err != nil {
			e.t.Fatal(err)
		}
		e.wantBalance(e.account("acme"), 10, 10, 0)
		// A void sent again changes nothing.
		if err := e.ledger.VoidTopUp(e.ctx, "acme", 100, "gw-1"); err != nil {
			e.t.Fatal(err)
		}
		e.wantBalance(e.account("acme"), 10, 10, 0)
		// It arrives after the void: it adds nothing.
		if err := e.ledger.VoidTopUp(e.ctx, "acme", 50, "gw-2"); err != nil {
			e.t.Fatal(err)
		}
		if _, applied, err := e.ledger.TopUp(e.ctx, "acme", 50, "gw-2"); err != nil || applied {
			e.t.Fatalf("a voided top-up applied: %v %v", applied, err)
		}
		e.wantBalance(e.account("acme"), 10, 10, 0)
		e.checkEvents("acme")
	}})
}
