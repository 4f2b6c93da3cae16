"""Pydantic models of the album service's HTTP bodies: what its OpenAPI schema shows."""

from pydantic import BaseModel, Field


class CreateAlbumRequest(BaseModel):
    name: str | None = Field(None, max_length=64, description="free label for the album")


class AlbumSummary(BaseModel):
    album_token: str = Field(description="the album's id; only the key that created it can use it")
    name: str
    image_count: int
    grouped_image_count: int = Field(description="images covered by the last grouping")
    group_count: int = Field(description="groups found by the last grouping (0: never grouped)")
    created_at: int = Field(description="Unix seconds")
    grouped_at: int | None = Field(None, description="Unix seconds of the last grouping")


class AddImagesResponse(BaseModel):
    album_token: str
    image_ids: list[str] = Field(description="one id per image sent, in the order sent")
    image_count: int = Field(description="images in the album now")


class ImageGroup(BaseModel):
    image_id: str
    group_id: int | None = Field(description="album-local group id; null until a grouping covers the image")


class AlbumDetail(AlbumSummary):
    images: list[ImageGroup] = Field(description="every image of the album, in the order added")


class AlbumServiceInfo(BaseModel):
    name: str
    input_shape: list[int] = Field(description="C, H, W of the images the service takes")
    max_images_per_request: int
    max_request_bytes: int
    max_images_per_album: int
    max_albums_per_key: int
    album_ttl_s: int = Field(description="an album idle this long is deleted")
    image_query_cost: str = Field(description="what a request is charged")
