"""URL configuration."""

from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from positions.apis import PositionListApi

urlpatterns = [
    path("admin/", admin.site.urls),
    path("", include("scheduler.urls")),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/", include("orders.urls")),
    path("api/positions/", PositionListApi.as_view(), name="positions"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="docs"),
]
