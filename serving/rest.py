"""`POST /v1/tag`: a photo's bytes in one request, its tags back as JSON, for scripts and catalogue jobs.

    curl --data-binary @photo.jpg "http://127.0.0.1:7860/v1/tag?name=photo.jpg"

Gradio's API takes three requests a photo (the upload, the call, the result's event stream), and under load that
handling, not the model, was most of the server's time (BENCHMARKS.md, "Serving efficiency"). This route is one
request: the body is the image file as it is on disk (any `Content-Type`; the bytes decide), decoded by the app's
one safe decoder and batched with the page's and /tag's photos by the same `TaggerService`, so it answers exactly
what /tag answers. Refusals are JSON `{"error": message}`: 400 for an unreadable image, 413 over the upload limit,
503 when more requests wait than the Gradio queue would hold (retry later).
"""

import logging

from fastapi import Request
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from .errors import UploadError, shown

logger = logging.getLogger("fashion_hf.app")

TAG_PATH = "/v1/tag"


class TooLarge(Exception):
    pass


async def body_within(request: Request, limit: int) -> bytes:
    """The request body, refused as soon as it is known to be over `limit` bytes (before it is all read)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise TooLarge
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise TooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def rest_routes(service) -> list[APIRoute]:
    """The app's plain HTTP routes, for `launch(app_kwargs={"routes": ...})`: FastAPI matches them before Gradio's."""
    settings = service.settings
    waiting_limit = settings.max_batch_size + settings.queue_size
    waiting = 0  # requests between arrival and answer; changed only on the event loop's thread

    def tag_bytes(data: bytes, name: str) -> dict:
        return service.tag(service.read_bytes(data, name))

    async def tag_photo(request: Request, name: str = "image") -> JSONResponse:
        """Tag one photo: the request body is the image file. Answers /tag's JSON."""
        nonlocal waiting
        if waiting >= waiting_limit:
            busy = "The server is busy: too many photos are waiting. Retry in a few seconds."
            return refusal(503, busy, {"Retry-After": "5"})
        waiting += 1
        try:
            data = await body_within(request, settings.max_upload_bytes)
            return JSONResponse(await run_in_threadpool(tag_bytes, data, name))
        except TooLarge:
            return refusal(413, f"{shown(name)} is over the {settings.max_upload_mb:g} MB upload limit.")
        except UploadError as error:
            return refusal(400, str(error))
        except ClientDisconnect:  # the sender left mid-upload: nothing to tag, nobody to answer
            return refusal(400, "The upload was interrupted.")
        except Exception:  # noqa: BLE001 - logged here; the caller learns only that its photo was not tagged
            logger.exception("POST %s failed", TAG_PATH)
            return refusal(500, "The photo could not be tagged: the server failed. Try again later.")
        finally:
            waiting -= 1

    return [APIRoute(TAG_PATH, tag_photo, methods=["POST"], summary="Tag one photo (the body is the image file)")]


def refusal(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)
