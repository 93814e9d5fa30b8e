package policy

import (
	"strings"
	"unicode/utf8"
)

// A price's model is a glob over the whole model name. Model names hold
// slashes (meta-llama/Llama-3-70b, openai/gpt-4o), so, unlike path.Match,
// no character is a separator: * matches any run of characters, / included,
// and ? exactly one. [a-z] matches one character of a class, [^a-z] one
// outside it, and \ quotes the character after it.

// globOK reports whether pattern is a well-formed glob: each \ quotes a
// character, and each [ opens a class of at least one character or range,
// closed by ], whose ranges run upward.
func globOK(pattern string) bool {
	for len(pattern) > 0 {
		switch pattern[0] {
		case '\\':
			if len(pattern) < 2 {
				return false
			}
			_, w := utf8.DecodeRuneInString(pattern[1:])
			pattern = pattern[1+w:]
		case '[':
			n, ok := classLen(pattern)
			if !ok {
				return false
			}
			pattern = pattern[n:]
		default:
			pattern = pattern[1:]
		}
	}
	return true
}

// matchGlob reports whether name matches the glob pattern. A malformed
// pattern matches nothing.
func matchGlob(pattern, name string) bool {
	if !globOK(pattern) {
		return false
	}
Chunks:
	for len(pattern) > 0 {
		star, chunk, rest := scanChunk(pattern)
		pattern = rest
		if star && chunk == "" {
			return true // a trailing * takes the rest of the name
		}
		// A chunk after a star is matched at its first place in the name:
		// the star that follows it takes whatever a later place would have
		// left. The last chunk must end the name.
		for i := 0; ; {
			if t, ok := matchChunk(chunk, name[i:]); ok && (pattern != "" || t == "") {
				name = t
				continue Chunks
			}
			if !star || i == len(name) {
				return false
			}
			_, w := utf8.DecodeRuneInString(name[i:])
			i += w
		}
	}
	return name == ""
}

// scanChunk splits a glob into its leading stars, the chunk up to the next
// star outside a class, and the rest.
func scanChunk(pattern string) (star bool, chunk, rest string) {
	for len(pattern) > 0 && pattern[0] == '*' {
		pattern, star = pattern[1:], true
	}
	inClass := false
	for i := 0; i < len(pattern); i++ {
		switch pattern[i] {
		case '\\':
			i++
		case '[':
			inClass = true
		case ']':
			inClass = false
		case '*':
			if !inClass {
				return star, pattern[:i], pattern[i:]
			}
		}
	}
	return star, pattern, ""
}

// matchChunk matches a chunk (a glob with no star) at the start of s and
// returns what follows it.
func matchChunk(chunk, s string) (rest string, ok bool) {
	for len(chunk) > 0 {
		if s == "" {
			return "", false
		}
		r, w := utf8.DecodeRuneInString(s)
		switch chunk[0] {
		case '?':
			chunk = chunk[1:]
		case '[':
			n, _ := classLen(chunk)
			if !inClass(chunk[:n], r) {
				return "", false
			}
			chunk = chunk[n:]
		default:
			if chunk[0] == '\\' {
				chunk = chunk[1:]
			}
			// A literal is compared byte for byte, invalid UTF-8 included.
			_, w = utf8.DecodeRuneInString(chunk)
			if !strings.HasPrefix(s, chunk[:w]) {
				return "", false
			}
			chunk = chunk[w:]
		}
		s = s[w:]
	}
	return s, true
}

// classLen returns the length of the class that starts the glob, [ to ].
func classLen(pattern string) (int, bool) {
	i := 1
	if i < len(pattern) && pattern[i] == '^' {
		i++
	}
	for ranges := 0; ; ranges++ {
		if i < len(pattern) && pattern[i] == ']' && ranges > 0 {
			return i + 1, true
		}
		lo, n, ok := classChar(pattern[i:])
		if !ok {
			return 0, false
		}
		i += n
		if i < len(pattern) && pattern[i] == '-' {
			hi, n, ok := classChar(pattern[i+1:])
			if !ok || hi < lo {
				return 0, false
			}
			i += 1 + n
		}
	}
}

// classChar reads one character of a class: any but - and ], or either
// quoted with \.
func classChar(s string) (r rune, n int, ok bool) {
	if s == "" || s[0] == '-' || s[0] == ']' {
		return 0, 0, false
	}
	if s[0] == '\\' {
		if len(s) < 2 {
			return 0, 0, false
		}
		r, w := utf8.DecodeRuneInString(s[1:])
		return r, 1 + w, true
	}
	r, w := utf8.DecodeRuneInString(s)
	return r, w, true
}

// inClass reports whether r is in a well-formed class, [ to ].
func inClass(class string, r rune) bool {
	class = class[1 : len(class)-1]
	negated := class != "" && class[0] == '^'
	if negated {
		class = class[1:]
	}
	in := false
	for class != "" {
		lo, n, _ := classChar(class)
		hi := lo
		class = class[n:]
		if class != "" && class[0] == '-' {
			hi, n, _ = classChar(class[1:])
			class = class[1+n:]
		}
		if lo <= r && r <= hi {
			in = true
		}
	}
	return in != negated
}
