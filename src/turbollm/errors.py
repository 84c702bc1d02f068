"""Errors a user can act on.

Every failure caused by input (a file, a flag, a prompt, a request) is raised as a
`TurbollmError` whose message is one line naming the thing that is wrong, the limit it
broke and, where there is one, the fix. The CLI prints that line and exits non-zero;
it never prints a traceback for these.
"""


class TurbollmError(Exception):
    """Base class for errors caused by the user's input, reported as one line."""


class GGUFError(TurbollmError):
    """A GGUF file is unreadable, corrupt, or describes a model we cannot run."""


class ContextLengthError(TurbollmError):
    """A prompt (plus the tokens asked for) does not fit the context window. `what` names the
    part that does not fit: "prompt" or "max_tokens" (the server reports it as the param)."""

    def __init__(self, message: str, what: str = "prompt"):
        super().__init__(message)
        self.what = what
