package meter

import (
	"errors"
	"testing"
)

// TestChargeKeys checks the charge's keys, built in one string, against
// the key builder's.
func TestChargeKeys(t *testing.T) {
	k, err := NewKeys("p")
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []chargeCall{
		{Org: "acme", RequestID: "g:1"},
		{Org: "o", RequestID: "i:key", Binding: "b"},
	} {
		got := chargeKeys(k, c.Org, c.RequestID, c.Binding != "")
		if want := c.keys(k); got != [6]string(want) {
			t.Errorf("chargeKeys(%+v) = %q, want %q", c, got, want)
		}
	}
}

// TestRespReader reads charge replies as Redis writes them, in RESP2 and
// RESP3, the batch script's error of one charge, and replies that are
// broken.
func TestRespReader(t *testing.T) {
	rd := respReader{b: []byte("*3\r\n" +
		"*4\r\n:2\r\n:-5\r\n:3\r\n$5\r\nkept!\r\n" +
		"*2\r\n:-1\r\n$19\r\nuser_script:1: oops\r\n" +
		"*7\r\n:0\r\n:9\r\n:1\r\n_\r\n:10\r\n:4\r\n:1700000000000\r\n")}
	n, err := rd.array()
	if err != nil || n != 3 {
		t.Fatalf("array: %d %v", n, err)
	}
	var r chargeReply
	if err := rd.charge(&r); err != nil || r.n != 4 || r.f[0].i != 2 || r.f[1].i != -5 || r.f[3].s != "kept!" {
		t.Fatalf("first reply %+v %v", r, err)
	}
	var se scriptError
	if err := rd.charge(&r); !errors.As(err, &se) || string(se) != "user_script:1: oops" || Classify(err) != Corrupt {
		t.Fatalf("second reply: %v, want the charge's script error", err)
	}
	if err := rd.charge(&r); err != nil || r.n != 7 || r.f[3].kind != 0 || r.f[6].i != 1700000000000 {
		t.Fatalf("third reply %+v %v", r, err)
	}
	for _, bad := range []string{"*3\r\n:1\r\n", "-NOSCRIPT no\r\n", "$3\r\nabc\r\n", "*1\r\n:x\r\n", "*1\r\n$9\r\nab\r\n"} {
		rd := respReader{b: []byte(bad)}
		if err := rd.charge(&r); err == nil {
			t.Errorf("%q: read as %+v", bad, r)
		}
	}
}
