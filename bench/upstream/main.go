// Command upstream is the stand-in AI backend of the load benchmark: it
// answers every request with the same small JSON body, after the delay the
// request's Bench-Delay header asks for (a Go duration, e.g. 50ms).
//
// It listens on -listen (default a free loopback port) and prints the
// address it listens on as its first line of output, so the benchmark
// needs no port guessing.
package main

import (
	"flag"
	"fmt"
	"log"
	"net"
	"net/http"
	"os"
	"strconv"
	"time"
)

// body is what every answer carries: small, like a short completion.
var body = []byte(`{"text":"A paragraph the AI wrote."}` + "\n")

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "address to listen on")
	flag.Parse()
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Fprintln(os.Stdout, ln.Addr().String())
	length := strconv.Itoa(len(body))
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if d := r.Header.Get("Bench-Delay"); d != "" {
			delay, err := time.ParseDuration(d)
			if err != nil {
				http.Error(w, "bad Bench-Delay", http.StatusBadRequest)
				return
			}
			time.Sleep(delay) // the model thinking, not synchronisation
		}
		hdr := w.Header()
		hdr["Content-Type"] = []string{"application/json"}
		hdr["Content-Length"] = []string{length}
		_, _ = w.Write(body)
	})
	log.Fatal(http.Serve(ln, h))
}
