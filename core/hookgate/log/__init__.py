"""The delivery log read back: queries over events, deliveries and attempts, and replays."""
