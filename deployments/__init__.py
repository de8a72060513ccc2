"""Ray Serve application (FastAPI ingress) for submitting storyboards over HTTP."""
