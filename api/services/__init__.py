"""What the routes do, as plain functions over a session and the settings."""
