// Test hooks that kill the process at a named step of a multi-step operation (a handoff), so that tests can show
// that a crash at each step resumes or rolls back. Off unless CHUNKD_TEST_CRASH_AT names the step; SIGKILL, so
// nothing after it runs, as in a real crash of the process.
export function crashPoint(step: string): void {
  if (process.env.CHUNKD_TEST_CRASH_AT === step) process.kill(process.pid, 'SIGKILL');
}
