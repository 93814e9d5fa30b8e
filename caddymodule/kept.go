package caddymodule

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"net/http"
	"net/textproto"
	"strconv"
	"strings"

	"github.com/creditsgw/caddy-credits/policy"
)

// A kept response is what the retries of a call with an Idempotency-Key are
// answered: the first call's status, headers and body, as the ledger keeps
// them.

// notKept are the response headers a kept response leaves out: they belong
// to one connection or one answer, or the replay sets them anew.
var notKept = map[string]bool{
	"Connection": true, "Keep-Alive": true, "Transfer-Encoding": true, "Trailer": true, "Upgrade": true,
	"Content-Length": true, "Date": true, policy.HeaderHold: true,
}

// encodeKept writes a response to keep: its status on a line, its headers
// as on the wire, a blank line, its body.
func encodeKept(status int, hdr http.Header, body []byte) []byte {
	var b bytes.Buffer
	b.WriteString(strconv.Itoa(status))
	b.WriteString("\r\n")
	keep := make(http.Header, len(hdr))
	for k, v := range hdr {
		if !notKept[k] && !policy.IsCreditsHeader(k) && !strings.HasPrefix(k, http.TrailerPrefix) {
			keep[k] = v
		}
	}
	_ = keep.Write(&b)
	b.WriteString("\r\n")
	b.Write(body)
	return b.Bytes()
}

// keptResponse is a response encodeKept wrote.
type keptResponse struct {
	status int
	header http.Header
	body   []byte
}

// parseKept reads a response encodeKept wrote.
func parseKept(data []byte) (keptResponse, error) {
	r := textproto.NewReader(bufio.NewReader(bytes.NewReader(data)))
	line, err := r.ReadLine()
	if err != nil {
		return keptResponse{}, err
	}
	status, err := strconv.Atoi(line)
	if err != nil || status < 200 || status > 599 {
		return keptResponse{}, fmt.Errorf("status line %q", line)
	}
	mh, err := r.ReadMIMEHeader()
	if err != nil {
		return keptResponse{}, err
	}
	body, err := io.ReadAll(r.R)
	if err != nil {
		return keptResponse{}, err
	}
	return keptResponse{status: status, header: http.Header(mh), body: body}, nil
}
