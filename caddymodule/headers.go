package caddymodule

import (
	"net/http"
	"strconv"
	"strings"

	"github.com/creditsgw/caddy-credits/policy"
)

// stripCreditsHeaders takes every Credits header out of h: only the gateway
// sets them, never a client's request or an upstream's response.
func stripCreditsHeaders(h http.Header) {
	for name := range h {
		if policy.IsCreditsHeader(name) {
			delete(h, name)
		}
	}
}

// setCreditsHeaders sets the Credits headers of a decision. vals, when not
// nil, holds the values, so that a settled call allocates no slices for
// them; it must belong to this response alone.
func setCreditsHeaders(h http.Header, d policy.Decision, vals *[3]string) {
	if vals == nil {
		vals = new([3]string)
	}
	vals[0] = strconv.FormatInt(d.Remaining, 10)
	vals[1] = strconv.FormatInt(d.Charged, 10)
	h[policy.HeaderRemaining] = vals[0:1:1]
	h[policy.HeaderCharged] = vals[1:2:2]
	if d.Notice != "" {
		vals[2] = d.Notice
		h[policy.HeaderNotice] = vals[2:3:3]
	}
	if d.BudgetRemaining != nil {
		h.Set(policy.HeaderBudgetRemaining, strconv.FormatInt(*d.BudgetRemaining, 10))
	}
}

// dropCreditsTrailers takes the Credits headers out of the upstream's
// Trailer announcement, and reports whether it announced Credits-Usage.
func dropCreditsTrailers(hdr http.Header) (usage bool) {
	announced, ok := hdr["Trailer"]
	if !ok {
		return false
	}
	var keep []string
	for _, v := range announced {
		for name := range strings.SplitSeq(v, ",") {
			name = strings.TrimSpace(name)
			switch {
			case name == "":
			case policy.IsCreditsHeader(name):
				usage = usage || strings.EqualFold(name, policy.HeaderUsage)
			default:
				keep = append(keep, name)
			}
		}
	}
	if len(keep) == 0 {
		delete(hdr, "Trailer")
	} else {
		hdr["Trailer"] = []string{strings.Join(keep, ", ")}
	}
	return usage
}

// takeCreditsTrailers takes the upstream's Credits trailers out of hdr, and
// a Credits-Usage it set after the headers, and returns that Credits-Usage:
// the trailer's over the header's.
func takeCreditsTrailers(hdr http.Header) (usage []string, ok bool) {
	usage, ok = hdr[policy.HeaderUsage]
	if v, found := hdr[http.TrailerPrefix+policy.HeaderUsage]; found {
		usage, ok = v, true
	}
	for k := range hdr {
		if name, found := strings.CutPrefix(k, http.TrailerPrefix); found && policy.IsCreditsHeader(name) {
			delete(hdr, k)
		}
	}
	delete(hdr, policy.HeaderUsage)
	return usage, ok
}
