"""The project's own error types. The runner turns these into a `failed` row (or a one-line exit) and lets
anything else through as a crash: a programming bug must not look like a bad input."""


class ProjectError(Exception):
    """Base of every error the project raises on purpose (bad input, bad config, failed run)."""


class InputError(ProjectError, ValueError):
    """An input (image, kernel, meta value, flag) cannot be used; the message names it."""


class ResourceError(ProjectError, RuntimeError):
    """A run would not fit (pixel budget, memory); the message says how much it needs."""
