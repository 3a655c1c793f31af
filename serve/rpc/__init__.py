"""The gRPC front-end: GenerationService and PackAdmin servicers, their interceptors (auth, decode guard)."""
