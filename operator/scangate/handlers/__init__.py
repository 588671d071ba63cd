"""kopf handlers: thin glue from events to the modules that do the work."""
