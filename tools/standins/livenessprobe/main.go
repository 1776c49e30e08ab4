// Command livenessprobe answers an HTTP /healthz with the CSI plugin's Probe:
// 200 when the plugin says it is ready, 500 when it says it is not, fails or
// takes longer than --probe-timeout. It takes the flags of the upstream
// sidecar that the DaemonSet passes.
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"net/http"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

func main() {
	flag.Int("v", 0, "log verbosity (accepted for the upstream sidecar's flags)")
	csiAddress := flag.String("csi-address", "/run/csi/socket", "the plugin's socket")
	httpEndpoint := flag.String("http-endpoint", ":9808", "address of the /healthz endpoint")
	probeTimeout := flag.Duration("probe-timeout", time.Second, "how long a Probe may take")
	flag.Parse()

	conn, err := grpc.NewClient("unix://"+*csiAddress, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		log.Fatalf("the plugin's address %s: %v", *csiAddress, err)
	}
	identity := csi.NewIdentityClient(conn)
	http.HandleFunc("/healthz", func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), *probeTimeout)
		defer cancel()
		answer, err := identity.Probe(ctx, &csi.ProbeRequest{})
		switch {
		case err != nil:
			http.Error(w, fmt.Sprintf("Probe failed: %v", err), http.StatusInternalServerError)
		case answer.GetReady() != nil && !answer.GetReady().GetValue():
			http.Error(w, "the plugin is not ready", http.StatusInternalServerError)
		default:
			fmt.Fprintln(w, "ok")
		}
	})
	log.Printf("serving /healthz on %s for the plugin at %s", *httpEndpoint, *csiAddress)
	log.Fatal(http.ListenAndServe(*httpEndpoint, nil))
}
