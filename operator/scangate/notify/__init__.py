"""Notifications: DingTalk robots and HTTP(S) webhooks."""
