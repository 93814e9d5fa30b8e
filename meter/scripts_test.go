package meter

import (
	"strings"
	"testing"
)

func TestWithLib(t *testing.T) {
	defined := map[string]bool{}
	for _, p := range libParts {
		if len(p.names) == 0 {
			t.Fatalf("a part of lib.lua defines no name:\n%s", p.text)
		}
		for _, n := range p.names {
			defined[n] = true
		}
	}
	for _, name := range []string{"load", "sweep", "commit", "srv_now", "OK", "FIELDS"} {
		if !defined[name] {
			t.Errorf("lib.lua's parts do not define %s", name)
		}
	}

	// Every lib name a composed script's code uses is defined in it, before
	// the script's own body.
	for name, body := range map[string]string{
		"charge": chargeLua, "settle": settleLua, "void": voidLua, "keep": keepLua, "lease": leaseLua,
		"hold": holdLua, "capture": captureLua, "release": releaseLua, "holds": holdsLua, "topup": topUpLua,
		"voidtopup": voidTopUpLua, "plan": planLua, "recharge": rechargeLua, "account": accountLua,
	} {
		script := withLib(body)
		if !strings.HasSuffix(script, body) {
			t.Errorf("%s: the script does not end with its body", name)
		}
		have := map[string]bool{}
		for _, line := range strings.Split(script, "\n") {
			if m := luaFunction.FindStringSubmatch(line); m != nil {
				have[m[1]] = true
			} else if m := luaLocals.FindStringSubmatch(line); m != nil {
				for _, n := range strings.Split(m[1], ",") {
					have[strings.TrimSpace(n)] = true
				}
			}
		}
		for _, id := range luaIdent.FindAllString(code(script), -1) {
			if defined[id] && !have[id] {
				t.Errorf("%s uses %s, which its script does not define", name, id)
			}
		}
	}

	// A script carries only what it uses: keep touches no account.
	keep := withLib(keepLua)
	if strings.Contains(keep, "local function load(") || strings.Contains(keep, "local function sweep(") {
		t.Errorf("the keep script carries account functions it never calls")
	}
	if n, all := len(withLib(chargeLua)), len(libLua)+len(chargeLua); n >= all {
		t.Errorf("the charge script is %d bytes, the whole library and its body %d", n, all)
	}
}
