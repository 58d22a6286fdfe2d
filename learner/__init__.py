"""The learner process: feeder, PPO-GAE trainer (actor + critic), weight broadcast."""
