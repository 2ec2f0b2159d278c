"""What a request is refused with, and text made safe to show in a message.

The service raises these plain exceptions; `app.py` shows them to the request's sender (a modal in the page,
`AppError` in gradio_client), never as a server traceback. Their messages name the input and what would be valid,
and are HTML-safe: Gradio renders error messages as HTML, so whatever a message echoes goes through `shown`.
"""

import errno
import html


class RequestError(Exception):
    """A request refused, with a message for its sender alone (HTML-safe)."""


class UploadError(RequestError):
    """An upload that is missing, over a limit, or not a readable image; it fails only its own request."""


class FeedbackError(RequestError):
    """A correction or a withdrawal that cannot be done as sent: no consent, empty, malformed, no such record."""


class StorageError(RequestError):
    """The feedback store failed; the message says how in words, never with the server's paths."""


def shown(text, limit: int = 80) -> str:
    """Text made safe to put in a message: Gradio renders error messages as HTML."""
    text = str(text)
    return html.escape(text if len(text) <= limit else text[:limit] + "…", quote=False)


def storage_problem(error: Exception) -> str:
    """What the store's failure was, in words for the user: the cause's errno, never the server's paths."""
    code = getattr(error.__cause__, "errno", None)
    if code in (errno.ENOSPC, errno.EDQUOT):
        return "the server's disk is full"
    if code in (errno.EROFS, errno.EACCES, errno.EPERM):
        return "the server's feedback storage is read-only"
    return "the server's storage failed"
