"""Command-line tools for people: role and data inspectors, chat, the paper-run rehearsal."""
