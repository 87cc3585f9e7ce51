from django.urls import path

from . import views

urlpatterns = [
    path("rooms/<str:room>/messages/", views.messages, name="messages"),
    path("async/rooms/<str:room>/messages/", views.async_messages, name="async-messages"),
    path("rooms/<str:room>/stream/", views.stream, name="stream"),
]
