"""Small pieces shared by server, agent, CLI and simulator: backoff, serving, addresses."""
