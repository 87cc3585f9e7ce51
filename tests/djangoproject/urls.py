from django.urls import path

from . import views

urlpatterns = [
    path("rooms/<str:room>/messages/", views.messages, name="messages"),
    path("async/rooms/<str:room>/messages/", views.async_messages, name="async-messages"),
    path("rooms/<str:room>/stream/", views.stream, name="stream"),
    path("rooms/<str:room>/posts/", views.post_message, name="post-message"),
    path("async/rooms/<str:room>/posts/", views.async_post_message, name="async-post-message"),
]
