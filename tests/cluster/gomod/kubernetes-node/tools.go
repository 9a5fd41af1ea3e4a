//go:build tools

// Package tools records the Kubernetes node commands this module builds, so `go mod tidy` keeps them. They live
// apart from ../kubernetes so that adding them does not change the control plane's cache key (and the fake-only
// cluster never builds them).
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-proxy"
	_ "k8s.io/kubernetes/cmd/kubelet"
)
