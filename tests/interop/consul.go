package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"sort"
	"strconv"
	"sync"
	"time"

	consulapi "github.com/hashicorp/consul/api"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	grpcresolver "google.golang.org/grpc/resolver"
)

// consulBuilder is the gRPC resolver Consul users write today: a blocking health query loop on
// one service (passing instances only, or every instance the catalog lists) feeding grpc-go.
type consulBuilder struct {
	client      *consulapi.Client
	passingOnly bool
	tag         string
}

func (consulBuilder) Scheme() string { return "consul" }

func (b consulBuilder) Build(target grpcresolver.Target, cc grpcresolver.ClientConn, _ grpcresolver.BuildOptions) (grpcresolver.Resolver, error) {
	ctx, cancel := context.WithCancel(context.Background())
	r := &consulResolver{cancel: cancel}
	r.wg.Add(1)
	go func() {
		defer r.wg.Done()
		watchService(ctx, b.client, target.Endpoint(), b.tag, b.passingOnly, func(addrs []string, _ uint64) {
			state := grpcresolver.State{}
			for _, a := range addrs {
				state.Addresses = append(state.Addresses, grpcresolver.Address{Addr: a})
			}
			_ = cc.UpdateState(state)
		})
	}()
	return r, nil
}

type consulResolver struct {
	cancel context.CancelFunc
	wg     sync.WaitGroup
}

func (*consulResolver) ResolveNow(grpcresolver.ResolveNowOptions) {}
func (r *consulResolver) Close()                                  { r.cancel(); r.wg.Wait() }

// watchService runs blocking queries on name until ctx ends, calling update with the sorted
// instance addresses ("ip:port") each time they change. Health().Service with passingOnly is what
// most gRPC-over-Consul resolvers use; without it, Catalog().Service lists every instance.
func watchService(ctx context.Context, client *consulapi.Client, name, tag string, passingOnly bool, update func([]string, uint64)) {
	var index uint64
	var last []string
	first := true
	for ctx.Err() == nil {
		opts := (&consulapi.QueryOptions{WaitIndex: index, WaitTime: 10 * time.Second}).WithContext(ctx)
		var addrs []string
		var meta *consulapi.QueryMeta
		var err error
		if passingOnly {
			var entries []*consulapi.ServiceEntry
			entries, meta, err = client.Health().Service(name, tag, true, opts)
			for _, e := range entries {
				addrs = append(addrs, instanceAddr(e.Service.Address, e.Node.Address, e.Service.Port))
			}
		} else {
			var services []*consulapi.CatalogService
			services, meta, err = client.Catalog().Service(name, tag, opts)
			for _, s := range services {
				addrs = append(addrs, instanceAddr(s.ServiceAddress, s.Address, s.ServicePort))
			}
		}
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			fmt.Fprintln(os.Stderr, "interop: consul query:", err)
			time.Sleep(200 * time.Millisecond)
			continue
		}
		// A lower index means the agent's state was reset (restart): start over.
		if meta.LastIndex < index {
			index = 0
		} else {
			index = meta.LastIndex
		}
		sort.Strings(addrs)
		if first || !equal(addrs, last) {
			first = false
			last = addrs
			update(addrs, meta.LastIndex)
		}
	}
}

func instanceAddr(serviceAddr, nodeAddr string, port int) string {
	host := serviceAddr
	if host == "" {
		host = nodeAddr
	}
	return net.JoinHostPort(host, strconv.Itoa(port))
}

func equal(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

func consulClient(addr string) *consulapi.Client {
	config := consulapi.DefaultConfig()
	config.Address = addr
	client, err := consulapi.NewClient(config)
	if err != nil {
		fail(err)
	}
	return client
}

// consulCall dials consul:///name with round_robin, as Consul users' gRPC clients do, waits up to
// wait for an instance, and makes n SayHello calls.
func consulCall(ctx context.Context, addr, name, tag string, passingOnly bool, n int) {
	builder := consulBuilder{client: consulClient(addr), passingOnly: passingOnly, tag: tag}
	conn, err := grpc.NewClient("consul:///"+name,
		grpc.WithResolvers(builder),
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultServiceConfig(`{"loadBalancingConfig":[{"round_robin":{}}]}`),
		grpc.WithDefaultCallOptions(grpc.ForceCodec(rawCodec{}), grpc.WaitForReady(true)))
	if err != nil {
		fail(err)
	}
	defer conn.Close()
	callN(ctx, conn, n, 0)
}

// consulWatch prints {"addrs":[...],"index":N,"at_ms":T} each time the instance set changes,
// until stdin closes: a test reads when a change became visible to a blocking query.
func consulWatch(addr, name, tag string, passingOnly bool) {
	ctx, cancel := context.WithCancel(context.Background())
	go func() {
		_, _ = io.Copy(io.Discard, os.Stdin)
		cancel()
	}()
	enc := json.NewEncoder(os.Stdout)
	watchService(ctx, consulClient(addr), name, tag, passingOnly, func(addrs []string, index uint64) {
		if addrs == nil {
			addrs = []string{}
		}
		_ = enc.Encode(map[string]any{"addrs": addrs, "index": index, "at_ms": time.Now().UnixMilli()})
	})
}
