"""Pydantic models of the victim service's HTTP bodies: what its OpenAPI schema shows."""

from pydantic import BaseModel, Field


class PredictJSONRequest(BaseModel):
    """Images as nested lists, N x C x H x W floats in [0, 1]."""

    images: list[list[list[list[float]]]] = Field(description="N x C x H x W floats in [0, 1]")


class ScoresResponse(BaseModel):
    scores: list[list[float]] = Field(description="N x K soft cluster memberships (scores mode)")


class LabelsResponse(BaseModel):
    labels: list[int] = Field(description="N cluster ids (labels mode)")


class ErrorResponse(BaseModel):
    error: str = Field(description="error class, e.g. BudgetExceeded")
    reason: str = Field(description="short label, e.g. budget, rate_limit, invalid_images")
    detail: str = Field(description="what was wrong and what was expected")
    requested: int | None = None
    remaining: int | None = Field(None, description="image-queries left in the budget (429)")
    retry_after_s: float | None = Field(None, description="when the rate limit allows it (429)")


class InfoResponse(BaseModel):
    name: str
    mode: str
    num_clusters: int
    input_shape: list[int]
    max_images_per_request: int
    max_request_bytes: int
    max_batch_size: int
    detection: str = Field("off", description="query detection policy: off, flag or block")


class BudgetResponse(BaseModel):
    key_id: str
    name: str
    role: str
    budget_total: int
    used: int
    remaining: int
    rate_per_s: float | None
    burst: float
    tokens: float
    refill_s: float
    revoked: bool


class CreateKeyRequest(BaseModel):
    name: str = Field(min_length=1, max_length=64)
    budget: int = Field(0, ge=0, description="total image-queries")
    rate_per_s: float | None = Field(None, gt=0, description="token-bucket rate; null = unlimited")
    burst: float | None = Field(None, ge=1, description="bucket size in images")
    role: str = Field("attacker", pattern="^(attacker|admin)$")


class IssuedKeyResponse(BaseModel):
    key_id: str
    api_key: str
    name: str
    role: str


class GrantRequest(BaseModel):
    images: int = Field(ge=1, description="image-queries to add to the total budget")


class ResetRequest(BaseModel):
    budget: int | None = Field(None, ge=0, description="new total budget; null keeps it")


class DetectionResponse(BaseModel):
    """What query detection saw of one key (``serving.detector.KeyDetection``)."""

    key_id: str
    name: str
    owner: str | None = Field(None, description="keys of one owner share one history and flag")
    scope: str = Field(description="key:<id> or owner:<owner>: whose history the key's queries join")
    queries: int = Field(description="images of this key screened")
    matched: int = Field(description="of them, images that matched an earlier query of the scope")
    first_match_query: int | None = Field(None, description="the key's query count at its first match")
    scope_queries: int
    recent_matched: int = Field(description="matched images among the scope's last flag_window queries")
    flagged: bool
    flagged_at: float | None = None
    flag_query: int | None = Field(None, description="the scope's query count when it was flagged")
    flag_key: str | None = None
    reason: str | None = None


class OwnerRequest(BaseModel):
    owner: str | None = Field(None, min_length=1, max_length=64, description="null unlinks the key")
