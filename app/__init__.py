"""ctbalancer: a certificate-pinning REST balancer for threat-intelligence matching instances."""
