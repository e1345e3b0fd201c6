"""Local launcher: runs the Tally suite as processes against the local PostgreSQL and RabbitMQ."""
