"""POST /v1/images/infer: one 2D image (a slice, a screenshot) and a prompt, answered directly — the same
result as `citrusv infer`'s JSON, with each mask's pixels as COCO RLE (or PNG) and its 256x256 RLE."""
from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from ..codec import b64decode, decode_image, strip_data_uri
from ..errors import ApiError
from ..jobs import Job
from ..schemas import ImageRequest
from ...model.processor import check_prompt_and_answer
from ..payloads import to_json_bytes
from ..tasks import image_runner
from . import Service, run_now

router = APIRouter(tags=["images"])


@router.post("/v1/images/infer")
async def infer_image(body: ImageRequest, request: Request, state: Service) -> Response:
    if body.max_new_tokens > state.config.max_new_tokens:
        raise ApiError(400, f"max_new_tokens {body.max_new_tokens} is more than this server allows "
                            f"({state.config.max_new_tokens})")
    check_prompt_and_answer(body.prompt, body.answer)
    server_min, server_max = state.config.pixel_budget()
    body = body.model_copy(update={"min_pixels": body.min_pixels or server_min, "max_pixels": body.max_pixels or server_max})
    image = await run_in_threadpool(_image_from, body.image)
    job = Job(task=f"image:{body.task}", runner=image_runner(state.engine, image, body), kept=False)
    result = await run_now(state, job, request)
    return Response(to_json_bytes(result), media_type="application/json")


def _image_from(text: str):
    return decode_image(b64decode(strip_data_uri(text, "image"), "image"), "the image")
