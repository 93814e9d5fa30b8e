// Package caddycredits registers the credits gateway's Caddy modules. It is
// what xcaddy imports for `--with github.com/creditsgw/caddy-credits`; the
// modules live in caddymodule.
package caddycredits

import (
	_ "github.com/creditsgw/caddy-credits/caddymodule"
)
