"""``POST /v1/images`` (upload a still) and ``GET /i/{name}`` (where hiapi fetches it)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, File, UploadFile, status
from fastapi.responses import Response

from app import images
from app.api.deps import CallerDep, ClockDep, ImagesRootDep, SessionDep, SettingsDep
from app.errors import AppError, NotFound
from app.limits import image_too_large, require_scope
from app.schemas import ErrorOut, ImageOut

__all__ = ["public_router", "router"]

router = APIRouter(prefix="/v1/images", tags=["images"])
public_router = APIRouter(tags=["images"])


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=ImageOut,
    summary="Upload a still image",
    description=(
        "Multipart upload (field `file`) of a JPEG, PNG or WebP image, recognised by its "
        "content, not its name. Returns an `id` to pass as `image_id` to `POST /v1/videos`, "
        "and the public, unguessable `url` hiapi fetches it from. Images are deleted "
        "IMAGE_RETENTION_SECONDS after their videos have ended."
    ),
    responses={
        401: {
            "model": ErrorOut,
            "description": (
                "No `Authorization: Bearer <API key>`, or an unknown key (`unauthorized`), "
                "checked before the body is read; only when the service has API keys configured."
            ),
        },
        403: {
            "model": ErrorOut,
            "description": "A client token without `images:create` (`insufficient_scope`).",
        },
        413: {
            "model": ErrorOut,
            "description": "Image larger than IMAGE_MAX_BYTES. The body is capped while it "
            "streams (IMAGE_MAX_BYTES plus the multipart framing), so an oversized upload is "
            "refused as soon as the cap is passed, or at once if Content-Length says so "
            "(`too_large`). Also `image_too_large`: more than 40 million pixels, or compressed "
            "data that inflates beyond what the image's dimensions need (a decompression bomb).",
        },
        415: {
            "model": ErrorOut,
            "description": "Not a JPEG, PNG or WebP image, or truncated, corrupt or animated "
            "(`unsupported_image`). Nothing is stored.",
        },
        422: {"model": ErrorOut, "description": "No `file` part in the form."},
    },
)
async def upload_image(
    file: Annotated[UploadFile, File(description="The image (JPEG, PNG or WebP).")],
    settings: SettingsDep,
    images_root: ImagesRootDep,
    clock: ClockDep,
    session: SessionDep,
    caller: CallerDep,
) -> ImageOut:
    require_scope(caller, "images:create")
    # app.limits.RequestGuard capped the stream at IMAGE_MAX_BYTES plus the multipart framing,
    # so no more than that was ever spooled; the file itself is held to the exact limit here.
    limit = settings.IMAGE_MAX_BYTES
    if file.size is not None and file.size > limit:
        raise image_too_large(limit)
    data = await file.read(limit + 1)
    if len(data) > limit:
        raise image_too_large(limit)
    try:
        info = await asyncio.to_thread(images.inspect_image, data)
    except images.NotAnImage as exc:  # 415, or 413 image_too_large for ImageTooLarge
        raise AppError(str(exc), code=exc.code, status_code=exc.status_code) from None
    token, key = await images.store(images_root, info, data)
    async with session.begin():
        image = await images.create(
            session,
            owner=caller.owner,
            subject=caller.stored_subject,
            info=info,
            data=data,
            token=token,
            key=key,
            now=clock(),
        )
    return ImageOut(
        id=image.id,
        url=images.public_url(settings.public_base, image),
        content_type=image.content_type,
        width=image.width,
        height=image.height,
        size_bytes=image.size_bytes,
        sha256=image.sha256,
        created_at=image.created_at,
    )


@public_router.get(
    "/i/{name}",
    response_class=Response,
    summary="An uploaded image, by its unguessable name",
    description="Public on purpose: hiapi fetches the still from here. No listing exists.",
    responses={404: {"model": ErrorOut, "description": "Unknown or deleted image."}},
)
async def public_image(name: str, images_root: ImagesRootDep, session: SessionDep) -> Response:
    token, _, extension = name.rpartition(".")
    image = await images.by_token(session, token) if token else None
    if image is None or image.extension != extension:
        raise NotFound("no such image")
    path = images.image_path(images_root, image.token, image.extension)
    # Read whole (at most IMAGE_MAX_BYTES) rather than streamed from the path: the retention
    # sweep may remove the file at any moment, and a file that vanished between the check and
    # the send would be a 500 and a cut connection instead of this 404.
    data = await asyncio.to_thread(_read_or_none, path)
    if data is None:
        raise NotFound("no such image")
    return Response(data, media_type=image.content_type)


def _read_or_none(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
