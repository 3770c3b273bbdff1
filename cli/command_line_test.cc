// The command-line parser against a spec of its own (two commands, flags defined here): flags
// per command, help and version, usage errors, and the environment's place between the command
// line and the defaults.
#include "cli/command_line.h"

#include <map>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

ABSL_FLAG(int, x_workers, 3, "workers in the ring");
ABSL_FLAG(std::string, x_listen, "127.0.0.1:50051", "listen address");
ABSL_FLAG(bool, x_causal, false, "causal mask");
ABSL_FLAG(int64_t, x_window, -1, "sliding window");
ABSL_FLAG(std::string, x_target, "127.0.0.1:50051", "the coordinator");

namespace ringattn {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::IsEmpty;
using ::testing::Not;

const CommandLineSpec& Spec() {
  static const CommandLineSpec* const spec = [] {
    auto* s = new CommandLineSpec;
    s->program = "prog";
    s->commands = {
        {"serve", "the server", "Serves.\n", {"x_workers", "x_listen"}, {"x_workers", "x_listen"}},
        {"attend", "one request", "Sends one.\n", {"x_target", "x_causal", "x_window"}, {}},
    };
    s->epilogue = "exit codes: see the docs\n";
    return s;
  }();
  return *spec;
}

// Every flag back to its default before each test: the parser sets the process's flags.
class CommandLineTest : public ::testing::Test {
 protected:
  void SetUp() override {
    absl::SetFlag(&FLAGS_x_workers, 3);
    absl::SetFlag(&FLAGS_x_listen, "127.0.0.1:50051");
    absl::SetFlag(&FLAGS_x_causal, false);
    absl::SetFlag(&FLAGS_x_window, -1);
    absl::SetFlag(&FLAGS_x_target, "127.0.0.1:50051");
  }

  absl::StatusOr<CommandLine> Parse(std::vector<std::string> args) {
    args.insert(args.begin(), "prog");
    return ParseCommandLine(Spec(), args, [this](const char* name) -> const char* {
      auto it = env_.find(name);
      return it == env_.end() ? nullptr : it->second.c_str();
    });
  }

  std::map<std::string, std::string> env_;
};

TEST_F(CommandLineTest, SetsTheCommandsFlagsInEverySpelling) {
  absl::StatusOr<CommandLine> line =
      Parse({"attend", "--x_target=h:1", "--x_causal", "--x_window", "-1"});
  ASSERT_TRUE(line.ok()) << line.status();
  EXPECT_EQ(line->action, CommandLine::Action::kRun);
  EXPECT_EQ(line->command->name, "attend");
  EXPECT_EQ(absl::GetFlag(FLAGS_x_target), "h:1");
  EXPECT_TRUE(absl::GetFlag(FLAGS_x_causal));
  EXPECT_EQ(absl::GetFlag(FLAGS_x_window), -1);
  EXPECT_THAT(line->from_command_line, ElementsAre("x_target", "x_causal", "x_window"));

  // One dash, a flag before the command, a bool's explicit value.
  line = Parse({"-x_window=7", "attend", "--x_causal=false"});
  ASSERT_TRUE(line.ok()) << line.status();
  EXPECT_EQ(absl::GetFlag(FLAGS_x_window), 7);
  EXPECT_FALSE(absl::GetFlag(FLAGS_x_causal));
}

TEST_F(CommandLineTest, NegatesBoolsWithNo) {
  absl::SetFlag(&FLAGS_x_causal, true);
  absl::StatusOr<CommandLine> line = Parse({"attend", "--nox_causal"});
  ASSERT_TRUE(line.ok()) << line.status();
  EXPECT_FALSE(absl::GetFlag(FLAGS_x_causal));
  EXPECT_THAT(Parse({"attend", "--nox_causal=1"}).status().message(),
              HasSubstr("unknown flag --nox_causal"));
  EXPECT_THAT(Parse({"attend", "--nox_window"}).status().message(),
              HasSubstr("unknown flag --nox_window"));
}

TEST_F(CommandLineTest, RefusesAFlagOfAnotherCommandNamingTheCommandsThatTakeIt) {
  absl::StatusOr<CommandLine> line = Parse({"serve", "--x_window=5"});
  ASSERT_TRUE(absl::IsInvalidArgument(line.status()));
  EXPECT_THAT(line.status().message(),
              HasSubstr("--x_window is not a flag of `prog serve`; it is one of attend"));
  EXPECT_EQ(absl::GetFlag(FLAGS_x_window), -1);  // nothing was set
}

TEST_F(CommandLineTest, UsageErrors) {
  const std::vector<std::pair<std::vector<std::string>, std::string>> cases = {
      {{"bogus"}, "unknown command 'bogus'"},
      {{"attend", "--nope=1"}, "unknown flag --nope"},
      {{"attend", "--flagfile=x"}, "unknown flag --flagfile"},  // absl's own flags are nobody's
      {{"attend", "extra"}, "unexpected argument 'extra'"},
      {{"attend", "--", "extra"}, "unexpected argument 'extra'"},
      {{"attend", "--x_target"}, "--x_target needs a value"},
      {{"attend", "--x_window=abc"}, "invalid value 'abc' for --x_window"},
      {{"attend", "--x_causal=maybe"}, "invalid value 'maybe' for --x_causal"},
      {{"--x_causal"}, "no command given"},
  };
  for (const auto& [args, message] : cases) {
    absl::StatusOr<CommandLine> line = Parse(args);
    ASSERT_TRUE(absl::IsInvalidArgument(line.status())) << args[0];
    EXPECT_THAT(line.status().message(), HasSubstr(message));
  }
  // No arguments at all: the message is the overview.
  absl::StatusOr<CommandLine> line = ParseCommandLine(
      Spec(), {"prog"}, [](const char*) { return static_cast<const char*>(nullptr); });
  EXPECT_THAT(line.status().message(), HasSubstr("commands:\n  serve   the server\n"));
}

TEST_F(CommandLineTest, HelpAndVersionAreAskedFor) {
  struct Case {
    std::vector<std::string> args;
    CommandLine::Action action;
    const char* command;  // null: none
  };
  for (const Case& c : std::vector<Case>{
           {{"help"}, CommandLine::Action::kHelp, nullptr},
           {{"--help"}, CommandLine::Action::kHelp, nullptr},
           {{"help", "serve"}, CommandLine::Action::kHelp, "serve"},
           {{"serve", "--help"}, CommandLine::Action::kHelp, "serve"},
           {{"serve", "--x_window=1", "-h"}, CommandLine::Action::kHelp, "serve"},
           {{"--x_listen", "h:1", "serve", "--help"}, CommandLine::Action::kHelp, "serve"},
           {{"attend", "--helpfull"}, CommandLine::Action::kHelpFull, nullptr},
           {{"--version"}, CommandLine::Action::kVersion, nullptr},
           {{"serve", "--version"}, CommandLine::Action::kVersion, nullptr},
       }) {
    absl::StatusOr<CommandLine> line = Parse(c.args);
    ASSERT_TRUE(line.ok()) << c.args[0] << ": " << line.status();
    EXPECT_EQ(line->action, c.action) << c.args[0];
    if (c.command == nullptr) {
      EXPECT_EQ(line->command, nullptr);
    } else {
      ASSERT_NE(line->command, nullptr);
      EXPECT_EQ(line->command->name, c.command);
    }
  }
  EXPECT_THAT(Parse({"help", "bogus"}).status().message(), HasSubstr("unknown command 'bogus'"));
}

TEST_F(CommandLineTest, CommandHelpListsOnlyItsFlagsWithDefaultsAndVariables) {
  const std::string help = CommandHelp(Spec(), *Spec().Find("serve"));
  EXPECT_THAT(help, HasSubstr("usage: prog serve [flags]\nServes.\nflags:\n"));
  EXPECT_THAT(help, HasSubstr("  --x_workers (workers in the ring); default: 3; env: "
                              "RINGATTN_X_WORKERS;\n"));
  EXPECT_THAT(help, HasSubstr("--x_listen (listen address); default: \"127.0.0.1:50051\";"));
  EXPECT_THAT(help, Not(HasSubstr("x_window")));
  EXPECT_THAT(help, Not(HasSubstr(".cc")));  // no source paths
  const std::string attend = CommandHelp(Spec(), *Spec().Find("attend"));
  EXPECT_THAT(attend, HasSubstr("--x_window (sliding window); default: -1;\n"));
  EXPECT_THAT(attend, Not(HasSubstr("env:")));

  const std::string all = AllFlagsHelp(Spec());
  EXPECT_THAT(all, HasSubstr("--x_window (sliding window); default: -1; commands: attend;\n"));
  EXPECT_THAT(all, HasSubstr("commands: serve; env: RINGATTN_X_WORKERS (serve);"));

  const std::string overview = Overview(Spec());
  EXPECT_THAT(overview, HasSubstr("usage: prog <command> [flags]\n"));
  EXPECT_THAT(overview, HasSubstr("  attend  one request\n"));
  EXPECT_THAT(overview, HasSubstr("exit codes: see the docs\n"));
}

TEST_F(CommandLineTest, TheEnvironmentSitsBetweenTheCommandLineAndTheDefault) {
  env_ = {{"RINGATTN_X_WORKERS", "5"},
          {"RINGATTN_X_LISTEN", "0.0.0.0:1"},
          {"RINGATTN_X_TARGET", "elsewhere:1"}};
  absl::StatusOr<CommandLine> line = Parse({"serve", "--x_listen=127.0.0.1:7"});
  ASSERT_TRUE(line.ok()) << line.status();
  EXPECT_EQ(absl::GetFlag(FLAGS_x_workers), 5);             // environment over default
  EXPECT_EQ(absl::GetFlag(FLAGS_x_listen), "127.0.0.1:7");  // command line over environment
  EXPECT_THAT(line->from_environment, ElementsAre("x_workers"));
  // attend reads no variable: its flags keep their defaults.
  line = Parse({"attend"});
  ASSERT_TRUE(line.ok()) << line.status();
  EXPECT_EQ(absl::GetFlag(FLAGS_x_target), "127.0.0.1:50051");
  EXPECT_THAT(line->from_environment, IsEmpty());

  env_ = {{"RINGATTN_X_WORKERS", "many"}};
  line = Parse({"serve"});
  ASSERT_TRUE(absl::IsInvalidArgument(line.status()));
  EXPECT_THAT(line.status().message(),
              HasSubstr("invalid value 'many' in RINGATTN_X_WORKERS (--x_workers)"));
  EXPECT_EQ(EnvironmentVariableOf(Spec(), "x_listen"), "RINGATTN_X_LISTEN");
}

}  // namespace
}  // namespace ringattn
