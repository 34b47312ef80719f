"""Reporting URLs: the landing page, sign-in for every user, the trader dashboard."""

from django.contrib.auth.views import LoginView, LogoutView
from django.urls import path

from reporting.views import home, trader_dashboard

urlpatterns = [
    path("", home, name="home"),
    path("login/", LoginView.as_view(template_name="reporting/login.html"), name="login"),
    path("logout/", LogoutView.as_view(next_page="home"), name="logout"),
    path("trader/", trader_dashboard, name="trader-dashboard"),
]
