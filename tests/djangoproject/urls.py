from django.urls import path

import replaylog
from replaylog.django.views import EventStreamView

from . import views

urlpatterns = [
    path("rooms/<str:room>/messages/", views.messages, name="messages"),
    path("async/rooms/<str:room>/messages/", views.async_messages, name="async-messages"),
    path("rooms/<str:room>/stream/", views.stream, name="stream"),
    path("rooms/<str:room>/posts/", views.post_message, name="post-message"),
    path("async/rooms/<str:room>/posts/", views.async_post_message, name="async-post-message"),
    path("events/<str:rooms>/", views.RoomEvents.as_view(), name="events"),
    path("lobby/events/", EventStreamView.as_view(channels=["lobby"]), name="lobby-events"),
    path(
        "heartbeat/events/",
        EventStreamView.as_view(channels=["quiet"], heartbeat=0.2),
        name="heartbeat-events",
    ),
    path(
        "unreachable/events/",
        # Nothing listens on port 1; the log connects at the first request, not here.
        EventStreamView.as_view(channels=["x"], log=replaylog.ReplayLog("redis://127.0.0.1:1/0")),
        name="unreachable-events",
    ),
    path(
        "capped/events/",
        EventStreamView.as_view(channels=["capped"], max_replay=3),
        name="capped-events",
    ),
]
