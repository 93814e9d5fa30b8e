# Caddy with the credits gateway, built with xcaddy:
#   docker build -f xcaddy.Dockerfile -t caddy-credits .
FROM caddy:2.11.9-builder AS builder
WORKDIR /src
COPY . .
RUN xcaddy build v2.11.9 \
	--with github.com/creditsgw/caddy-credits@v0.0.0-00010101000000-000000000000=/src

FROM caddy:2.11.9
COPY --from=builder /usr/bin/caddy /usr/bin/caddy
# The demo page and credits.js: the demo Caddyfile serves web/ of its
# working directory, deploy/Caddyfile serves /srv/web.
WORKDIR /srv
COPY web /srv/web
