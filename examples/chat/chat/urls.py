from django.urls import path
from django.views.generic import RedirectView

from . import views

urlpatterns = [
    path("", RedirectView.as_view(url="/rooms/lobby/")),
    path("rooms/<str:rooms>/", views.room_page, name="rooms"),
    path("rooms/<str:room>/messages/", views.post_message, name="messages"),
    path("rooms/<str:rooms>/events/", views.RoomEvents.as_view(), name="events"),
]
