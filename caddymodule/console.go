package caddymodule

import (
	"bytes"
	"crypto/sha256"
	"embed"
	"encoding/hex"
	"net/http"
	"time"
)

// The usage console: a page that credits_admin serves at its mount root and
// that calls the admin API beside it with relative URLs, so it works under
// any prefix. Its files are in the binary; it loads nothing from elsewhere.
//
//go:embed console/index.html console/console.js console/console.css
var consoleFS embed.FS

// consoleFile is one file of the console, read once at start.
type consoleFile struct {
	name        string
	contentType string
	data        []byte
	etag        string
}

// consoleFiles maps the paths after the admin prefix to the console's files.
var consoleFiles = map[string]*consoleFile{
	"/":            loadConsoleFile("console/index.html", "text/html; charset=utf-8"),
	"/console.js":  loadConsoleFile("console/console.js", "text/javascript; charset=utf-8"),
	"/console.css": loadConsoleFile("console/console.css", "text/css; charset=utf-8"),
}

func loadConsoleFile(name, contentType string) *consoleFile {
	data, err := consoleFS.ReadFile(name)
	if err != nil {
		// The embed directive above lists every file, so the build fails
		// before this can.
		panic(err)
	}
	sum := sha256.Sum256(data)
	return &consoleFile{name: name, contentType: contentType, data: data, etag: `"` + hex.EncodeToString(sum[:8]) + `"`}
}

// consoleCSP lets the console run only its own script and style, call only
// its own origin, never be framed (it has buttons that spend money), and
// never submit a form natively (the token must not end up in a URL).
const consoleCSP = "default-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'; object-src 'none'"

// serveConsole answers a GET or HEAD of one of the console's files and
// reports whether it did. The files hold no data, and a browser sends no
// bearer token when it navigates, so they need no token; every call the
// page makes does.
func serveConsole(w http.ResponseWriter, r *http.Request) bool {
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		return false
	}
	f, ok := consoleFiles[r.URL.Path]
	if !ok {
		return false
	}
	h := w.Header()
	h.Set("Content-Type", f.contentType)
	h.Set("Content-Security-Policy", consoleCSP)
	h.Set("X-Content-Type-Options", "nosniff")
	h.Set("Referrer-Policy", "no-referrer")
	// Revalidate every time, so a new binary's console is used at once; the
	// ETag makes that a 304.
	h.Set("Cache-Control", "no-cache")
	h.Set("ETag", f.etag)
	http.ServeContent(w, r, f.name, time.Time{}, bytes.NewReader(f.data))
	return true
}
