package redistest

import "github.com/redis/go-redis/v9"

// CommandHook is the part of a go-redis hook that tests seldom change: it
// passes dials and pipelines through. A test's hook embeds it and defines
// ProcessHook, to see or change single commands.
type CommandHook struct{}

// DialHook passes dials through.
func (CommandHook) DialHook(next redis.DialHook) redis.DialHook { return next }

// ProcessPipelineHook passes pipelines through.
func (CommandHook) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return next
}
