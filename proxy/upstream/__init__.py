"""The one client of together.ai (client.py): a small keep-alive HTTP/1.1 pool."""
