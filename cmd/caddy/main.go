// Command caddy is Caddy with its standard modules and the credits gateway.
package main

import (
	caddycmd "github.com/caddyserver/caddy/v2/cmd"

	_ "github.com/caddyserver/caddy/v2/modules/standard"

	_ "github.com/creditsgw/caddy-credits/caddymodule"
)

func main() {
	caddycmd.Main()
}
