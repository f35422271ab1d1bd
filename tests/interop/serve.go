package main

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"os"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/protobuf/encoding/protowire"
)

// countingListener counts the connections it accepts and prints the count on each.
type countingListener struct {
	net.Listener
	accepted atomic.Int64
}

func (l *countingListener) Accept() (net.Conn, error) {
	conn, err := l.Listener.Accept()
	if err == nil {
		fmt.Printf("accepted %d\n", l.accepted.Add(1))
	}
	return conn, err
}

// serve runs a grpc-go Greeter server on listen, with the keep-alive enforcement policy a Go
// service gets by default except for its MinTime (scaled down by tests): a client that pings
// more often, or at all with no RPC open, is sent GOAWAY too_many_pings and cut off. Prints
// "ready ADDR", then "accepted N" for each connection, until stdin closes.
func serve(listen string, minTime time.Duration) {
	inner, err := net.Listen("tcp", listen)
	if err != nil {
		fmt.Fprintln(os.Stderr, "listen:", err)
		os.Exit(1)
	}
	lis := &countingListener{Listener: inner}
	addr := inner.Addr().String()
	srv := grpc.NewServer(
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: minTime}),
		grpc.ForceServerCodec(rawCodec{}),
		grpc.UnknownServiceHandler(func(_ any, stream grpc.ServerStream) error {
			var request []byte
			if err := stream.RecvMsg(&request); err != nil {
				return err
			}
			reply := protowire.AppendTag(nil, 2, protowire.BytesType)
			reply = protowire.AppendString(reply, addr)
			return stream.SendMsg(&reply)
		}),
	)
	go func() { _ = srv.Serve(lis) }()
	fmt.Printf("ready %s\n", addr)
	_, _ = io.Copy(io.Discard, bufio.NewReader(os.Stdin))
	srv.Stop()
}
