"""Requests to an OpenAI-compatible chat-completions endpoint: the request body (image as a
re-encoded PNG data URL), one call with retries and backoff, the answer record it yields."""

import base64
import email.utils
import io
import math
import time

from orbital_clip import images

RETRY_STATUS = {408, 409, 429}  # and every 5xx: the endpoint's trouble, worth another try
FATAL_STATUS = {401, 403, 404}  # a wrong key, no access, no such model: every request would fail
MAX_RETRY_AFTER_S = 300.0  # a longer Retry-After is treated as this (the run stays bounded)


class MissingClientError(RuntimeError):
    pass


def encode_image(path):
    """A PNG data URL of the image's pixels only: decoded (EXIF orientation applied) and written
    afresh, so no EXIF, no text chunks and no file name leave the machine."""
    image = images.read_image(path)  # ImageReadError on an unreadable file
    image = image.copy()
    image.info.clear()  # Pillow's PNG writer copies info["icc_profile"] (free text inside) otherwise
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")  # no exif=/pnginfo=/icc_profile given: pixels only
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def build_request(model, system, text, data_url, temperature, seed, max_tokens):
    """The chat-completions body (what the cache key is computed on)."""
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": [
        {"type": "text", "text": text},
        {"type": "image_url", "image_url": {"url": data_url}}]})
    return {"model": model, "messages": messages, "temperature": temperature, "seed": seed,
            "max_tokens": max_tokens}


def make_client(base_url, api_key, timeout_s, local=False):
    """The official openai client, without its own retries (ours are counted and flag-driven).
    For a `local` (loopback) base URL the environment's HTTP(S)_PROXY is ignored: a request the
    user was told goes to this machine must not leave it through a proxy."""
    try:
        import openai  # optional: only the sending run needs it
    except ImportError:
        raise MissingClientError("the 'openai' package is not installed; pip install -r "
                                 "requirements-ask.txt (--dry-run works without it)") from None
    extra = {"http_client": openai.DefaultHttpxClient(trust_env=False)} if local else {}
    return openai.OpenAI(base_url=base_url, api_key=api_key, timeout=timeout_s, max_retries=0, **extra)


def is_retryable(err):
    """429, 408/409, 5xx, timeouts and dropped connections are retried; 400/401/404 are not."""
    status = getattr(err, "status_code", None)
    if status is not None:
        return status in RETRY_STATUS or status >= 500
    return type(err).__name__ in {"APITimeoutError", "APIConnectionError"}


def is_fatal(err):
    """401, 403, 404: the key, the access or the model name is wrong; no request can succeed."""
    return getattr(err, "status_code", None) in FATAL_STATUS


def retry_after_s(err):
    """The server's Retry-After (retry-after-ms, seconds or an HTTP date) of an error, or None."""
    headers = getattr(getattr(err, "response", None), "headers", None)
    if headers is None:
        return None
    for name, divisor in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) / divisor
        except ValueError:
            parsed = email.utils.parsedate_tz(value) if name == "retry-after" else None
            if parsed is None:
                continue
            seconds = email.utils.mktime_tz(parsed) - time.time()
        if math.isnan(seconds):
            continue
        return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)
    return None


def answer_record(response, latency_s, attempts):
    """{status, answer, refusal, tokens, ...} of one completed response; a response without a
    text answer is 'failed: malformed response' (not cached, so a rerun asks again)."""
    record = {"latency_s": round(latency_s, 3), "attempts": attempts, "prompt_tokens": 0,
              "completion_tokens": 0, "answer": "", "refusal": False, "finish_reason": None}
    try:
        usage = getattr(response, "usage", None)
        if usage is not None:
            record["prompt_tokens"] = int(usage.prompt_tokens or 0)
            record["completion_tokens"] = int(usage.completion_tokens or 0)
        choice = response.choices[0]
        message = choice.message
        record["finish_reason"] = choice.finish_reason
        refusal = getattr(message, "refusal", None)
        if refusal or choice.finish_reason == "content_filter":
            return {**record, "status": "ok", "refusal": True, "answer": str(refusal or message.content or "")}
        if not isinstance(message.content, str):
            raise TypeError("no text content")
        return {**record, "status": "ok", "answer": message.content}
    except (AttributeError, IndexError, TypeError, ValueError) as err:
        return {**record, "status": f"failed: malformed response ({type(err).__name__})"}


def send_with_retries(client, request, max_retries, backoff_s, sleep=time.sleep):
    """One request, retried with exponential backoff (backoff_s, 2*backoff_s, ...) on a
    retryable error, waiting at least the server's Retry-After; a record with status
    'failed: ...' once they are spent ('fatal': True on 401/403/404)."""
    started = time.monotonic()
    for attempt in range(1, max_retries + 2):
        try:
            response = client.chat.completions.create(**request)
            return answer_record(response, time.monotonic() - started, attempt)
        except Exception as err:  # noqa: BLE001 - the openai client's errors, and a malformed body
            status = getattr(err, "status_code", None)
            reason = f"HTTP {status}" if status else type(err).__name__
            if type(err).__name__ == "APIResponseValidationError":  # a 200 whose body is no completion
                reason = "malformed response"
            if not is_retryable(err):
                return {"status": f"failed: {reason}", "attempts": attempt, "fatal": is_fatal(err),
                        "latency_s": round(time.monotonic() - started, 3)}
            if attempt > max_retries:
                return {"status": f"failed: {reason} after {attempt} attempts", "attempts": attempt,
                        "latency_s": round(time.monotonic() - started, 3)}
            sleep(max(backoff_s * 2 ** (attempt - 1), retry_after_s(err) or 0.0))
