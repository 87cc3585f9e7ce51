from django.urls import path

from . import views

urlpatterns = [
    path("rooms/<str:room>/messages/", views.messages, name="messages"),
]
