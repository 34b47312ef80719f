"""URL configuration."""

from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularRedocView, SpectacularSwaggerView

from exchanges.apis import PriceApi
from positions.apis import FillListApi, PositionListApi

urlpatterns = [
    path("admin/", admin.site.urls),
    path("", include("scheduler.urls")),
    path("", include("reporting.urls")),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/", include("orders.urls")),
    path("api/positions/", PositionListApi.as_view(), name="positions"),
    path("api/fills/", FillListApi.as_view(), name="fills"),
    path("api/prices/", PriceApi.as_view(), name="prices"),
    # Swagger UI and Redoc load their bundles from drf-spectacular-sidecar's static files: they work offline.
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="docs"),
    path(
        "api/redoc/",
        SpectacularRedocView.as_view(url_name="schema", template_name="reporting/redoc.html"),
        name="redoc",
    ),
]
