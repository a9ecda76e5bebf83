"""What talking to object stores needs beyond fsspec (for `core/locations.py`): the one-line StoreError each reply
or failure of a server means (wrong credentials, a missing bucket, no server), and obstore's S3Store for zarr with
the endpoint, region and credentials botocore resolves for s3fs, so both clients see the same settings."""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone
from typing import Any

from genrecal_cache.core.errors import StoreError, StoreServerError

CREDENTIALS_HINT = {  # what a user sets for each protocol, named in "access denied" errors
    "s3": "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE, or key/secret in --storage-options",
    "gs": "GOOGLE_APPLICATION_CREDENTIALS, or token in --storage-options",
    "az": "AZURE_STORAGE_CONNECTION_STRING or AZURE_STORAGE_ACCOUNT_NAME/_KEY, or --storage-options",
}
# Exceptions meaning "the server did not answer", by class name: botocore, aiohttp and the builtins each have their
# own (and gcsfs/adlfs reuse aiohttp's), and naming them keeps this module free of those imports.
UNREACHABLE = {"EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
               "ClientConnectorError", "ServerDisconnectedError", "ClientOSError", "ConnectionError",
               "TimeoutError", "gaierror", "HTTPClientError", "FSTimeoutError"}
UNREACHABLE_TEXT = ("error sending request",)  # obstore's GenericError when nothing answers
# S3 error codes, HTTP statuses and (obstore) class names that mean the credentials were refused.
DENIED = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "Forbidden", "ExpiredToken",
          "InvalidToken", "InvalidClientTokenId", "AllAccessDisabled", "PermissionDeniedError",
          "UnauthenticatedError"}
REFUSED = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}  # a conditional write refused
# obstore's errors carry the server's reply only as text: "... status code: 403 Forbidden: <Code>...</Code>"
SERVER_REPLY = re.compile(r"<Code>(\w+)</Code>|status code: (\d{3})")


def reply_codes(exc: BaseException) -> tuple[set[str], set[str]]:
    """The class names along the exception's chain, and the S3 error codes and HTTP statuses in it (s3fs raises
    builtin exceptions caused by botocore's ClientError; obstore has them in its message)."""
    names: set[str] = set()
    codes: set[str] = set()
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        names.update(c.__name__ for c in type(e).__mro__)
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            codes.update(str(x) for x in ((response.get("Error") or {}).get("Code"), status) if x)
        codes.update(c for pair in SERVER_REPLY.findall(str(e)) for c in pair if c)
        e = e.__cause__ or e.__context__
    return names, codes


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]


def missing_bucket(url: str, bucket: str, endpoint: str) -> StoreError:
    return StoreServerError(f"{url}: the bucket {bucket!r} does not exist at {endpoint}; create it, or check the URL "
                            "and the endpoint (AWS_ENDPOINT_URL)")


def server_error(url: str, exc: BaseException, doing: str, *, protocol: str, bucket: str, endpoint: str
                 ) -> StoreError | None:
    """The one-line StoreError that `exc`, raised while `doing` something at `url`, means to a user; None when it is
    none of these (a missing object, a refused condition, a bug): the caller decides."""
    names, codes = reply_codes(exc)
    hint = CREDENTIALS_HINT.get(protocol, "the credentials in --storage-options")
    if codes & DENIED or names & (DENIED | {"PermissionError"}):
        return StoreServerError(f"{url}: access denied while {doing} ({one_line(exc)}); check the credentials "
                                f"({hint}) and that they may use the bucket {bucket!r}")
    if "NoSuchBucket" in codes or "bucket does not exist" in str(exc).lower():
        return missing_bucket(url, bucket, endpoint)
    if "NoCredentialsError" in names:
        return StoreServerError(f"{url}: no credentials found while {doing}; set them ({hint})")
    if names & UNREACHABLE or any(t in str(exc) for t in UNREACHABLE_TEXT):
        return StoreServerError(f"{url}: cannot reach the server at {endpoint} while {doing} "
                                f"({type(exc).__name__}); check that it is running and the endpoint "
                                "(AWS_ENDPOINT_URL, or client_kwargs.endpoint_url in --storage-options)")
    return None


def obstore_s3(bucket: str, prefix: str, endpoint: str, region: str | None, options: dict[str, Any]):
    """obstore's S3Store for `bucket`/`prefix` at the endpoint and region botocore resolved for s3fs, signing with
    `BotocoreCredentials(options)`; `anon` in the options: unsigned requests; botocore's retry limit, if given, its
    own too."""
    from obstore.store import S3Store

    config: dict[str, Any] = {"region": region or "us-east-1"}
    if "amazonaws.com" not in endpoint:  # AWS itself: obstore finds the endpoint from the region
        config["endpoint"] = endpoint
    anon = bool(options.get("anon"))
    if anon:
        config["skip_signature"] = True
    # botocore's retry limit (config_kwargs: {retries: {max_attempts: n}}) holds for both clients
    attempts = ((options.get("config_kwargs") or {}).get("retries") or {}).get("max_attempts")
    retry = {"max_retries": max(int(attempts) - 1, 0)} if attempts is not None else None
    return S3Store(bucket, prefix=prefix or None, config=config,
                   client_options={"allow_http": endpoint.startswith("http://")}, retry_config=retry,
                   credential_provider=None if anon else BotocoreCredentials(options))


class BotocoreCredentials:
    """obstore's credential callback, resolved as s3fs resolves them: key/secret/token from the storage options,
    else botocore's chain (environment, profile, config files, SSO, instance metadata), refreshed as they expire.
    Picklable (the resolved credentials are not kept), so a store can go to a worker process."""

    TTL = timedelta(minutes=5)  # how long obstore keeps refreshable credentials before asking again

    def __init__(self, options: dict[str, Any]):
        self.options, self._credentials = dict(options), None

    def __getstate__(self) -> dict[str, Any]:
        return {"options": self.options, "_credentials": None}

    def __call__(self) -> dict[str, Any]:
        o = self.options
        if o.get("key") and o.get("secret"):
            return {"access_key_id": o["key"], "secret_access_key": o["secret"], "token": o.get("token"),
                    "expires_at": None}
        if self._credentials is None:
            import botocore.session

            self._credentials = botocore.session.Session(profile=o.get("profile")).get_credentials()
            if self._credentials is None:
                raise StoreServerError(f"no S3 credentials found; set them ({CREDENTIALS_HINT['s3']})")
        frozen = self._credentials.get_frozen_credentials()
        return {"access_key_id": frozen.access_key, "secret_access_key": frozen.secret_key, "token": frozen.token,
                "expires_at": datetime.now(timezone.utc) + self.TTL}
